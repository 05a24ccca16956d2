"""The repository's entry to the `aml` command line (`python cli.py ...`, torchrun's script); the CLI is aml/cli.py."""

from __future__ import annotations

from aml.cli import cli, main  # noqa: F401  (the click group too, for whoever loads this file)

if __name__ == "__main__":
    main()
