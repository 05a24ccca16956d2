"""The `aml` command line: a thin click layer over the library (each command lives in aml/commands/)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

# name -> (module under aml.commands, one-line help). Modules load only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("models", "List the model registry: dimensions and where weights come from."),
    "extract": ("extract", "Embed a list of images with a model or checkpoint into an .npy file."),
    "evaluate": ("evaluate", "Revisited Oxford/Paris-style evaluation: symmetric and asymmetric mAP."),
    "data": ("data", "Dataset tools: synthetic landmarks, splits in revisitop layout."),
    "distill": ("distill", "Train a student into the teacher's embedding space (AML)."),
    "export": ("export", "Export a student checkpoint as a verified ONNX / TorchScript query encoder."),
    "embed": ("embed", "Embed images with an exported ONNX encoder (onnxruntime only, no torch)."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n in COMMANDS if importlib.util.find_spec(f"aml.commands.{COMMANDS[n][0]}")]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or name not in self.list_commands(ctx):
            return None
        module = importlib.import_module(f"aml.commands.{COMMANDS[name][0]}")
        cmd = module.command
        cmd.short_help = cmd.short_help or COMMANDS[name][1]
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, COMMANDS[n][1]) for n in self.list_commands(ctx)]
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
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
