"""`aml models`: the model registry as a table."""

from __future__ import annotations

import click


@click.command("models")
def command() -> None:
    """List registered backbones: role, output dimension, and where their weights come from."""
    from aml.registry import list_models

    rows = [(r["name"], r["roles"], str(r["dim"]), r["weights"]) for r in list_models()]
    head = ("name", "role", "dim", "weights")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    for r in [head, *rows]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    click.echo(
        "\nAny name works on either side: --student NAME adds the 1x1 projection to the teacher's "
        "dimension.\nA checkpoint file (cirtorch or aml) can be given wherever a name is expected."
    )
