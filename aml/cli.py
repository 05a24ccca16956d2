"""The `aml` command line: a lazy click group over the commands in aml/commands/ (the console script `aml`)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

import click

# The commands, in `aml --help` order; each is `command` in aml/commands/<name>.py. Modules load only when
# their command runs; the one-line help is the module docstring's first line ("`aml NAME`: what it does").
COMMANDS = ("models", "extract", "evaluate", "data", "distill", "whiten", "export", "embed", "index", "search",
            "serve", "keys")  # fmt: skip


def short_help(name: str) -> str:
    """The one-line help of a command, read from its module's docstring without importing it."""
    spec = importlib.util.find_spec(f"aml.commands.{name}")
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    line = doc.splitlines()[0] if doc else ""
    text = line.split(": ", 1)[1] if line.startswith("`aml ") and ": " in line else line
    return text[:1].upper() + text[1:]


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n in COMMANDS if importlib.util.find_spec(f"aml.commands.{n}")]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or name not in self.list_commands(ctx):
            return None
        module = importlib.import_module(f"aml.commands.{name}")
        cmd = module.command
        cmd.short_help = cmd.short_help or short_help(name)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, short_help(n)) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aml")
def cli() -> None:
    """aml: asymmetric retrieval distillation (teacher indexes, student queries)."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit 2, never a traceback."""
    from aml.allocator import keep_freed_memory
    from aml.errors import UserError

    keep_freed_memory()
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        if e.filename is None:
            raise
        click.echo(f"error: {e.filename}: {e.strerror or e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
