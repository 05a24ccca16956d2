"""`aml keys`: API keys for `aml serve --keys FILE` (the file stores only their hashes)."""

from __future__ import annotations

import click


@click.group("keys")
def command() -> None:
    """Create and list the API keys of `aml serve --keys FILE`."""


@command.command("new")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--label", default="", help="A note stored beside the hash (who the key is for).")
def new(file, label) -> None:
    """Print a new key once; FILE keeps only its salted hash (delete its line to revoke it)."""
    from aml.serve.keys import new_key

    key = new_key(file, " ".join(label.split()))
    click.echo(key)
    click.echo(f"{file}: key {key.split('_')[1]} added; the key is shown only now", err=True)


@command.command("list")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
def list_keys(file) -> None:
    """List the key ids and labels of a keys file (never the keys)."""
    from pathlib import Path

    from aml.serve.keys import parse_keys

    for key_id, (_, _, _, label) in parse_keys(Path(file).read_text(), Path(file)).items():
        click.echo(f"{key_id} {label}".rstrip())
