"""The shared CLI options: every TrainConfig field is an `aml distill` option, help shows the library's
defaults, `--whiten` / `--multiscale` / `--batch-size` mean one thing everywhere, commands import no sibling."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import click

from aml.settings import CPU_BATCH, MULTISCALE
from aml.train.config import PRESETS, TrainConfig

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("models", "extract", "evaluate", "data", "distill", "whiten", "export", "embed", "index", "search",
            "serve", "keys")  # fmt: skip


def _command(name: str) -> click.Command:
    cmd = importlib.import_module(f"aml.commands.{name}").command
    return cmd.commands["models"] if name == "evaluate" else cmd  # a group: its models subcommand takes these


def _options(cmd: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in cmd.params if isinstance(p, click.Option)}


def test_every_train_config_field_is_a_distill_option():
    opts = _options(_command("distill"))
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in opts]
    assert not missing, missing
    for name in ("lr_decay", "gem_lr_mult", "bn_images"):
        assert opts[name].opts == ["--" + name.replace("_", "-")]


def test_distill_help_defaults_come_from_the_config_and_the_demo_preset():
    opts = _options(_command("distill"))
    default, demo = TrainConfig(), PRESETS["demo"]
    assert f"Default {default.image_size}; demo {demo['image_size']}" in opts["image_size"].help
    assert f"Default {default.teacher}; demo {demo['teacher']}" in opts["teacher"].help
    assert f"demo {demo['lr_decay']:.6g}" in opts["lr_decay"].help


def test_distill_options_override_the_preset():
    from aml.commands.distill import config_from_options

    given = {f.name: None for f in dataclasses.fields(TrainConfig)}
    cfg = config_from_options("demo", {**given, "lr_decay": 0.5, "gem_lr_mult": 3.0, "bn_images": 7, "loss_args": ()})
    assert (cfg.lr_decay, cfg.gem_lr_mult, cfg.bn_images) == (0.5, 3.0, 7)
    assert cfg.image_size == PRESETS["demo"]["image_size"] and cfg.loss_args == PRESETS["demo"]["loss_args"]
    other = config_from_options("demo", {**given, "loss": "contr+", "loss_args": ()})
    assert other.loss_args == {}  # the preset's constants belong to the preset's loss
    cfg = config_from_options("aml", {**given, "loss_args": ("alpha=2",)})
    assert cfg.loss_args == {"alpha": 2.0} and cfg == TrainConfig(loss_args={"alpha": 2.0})


def test_shared_options_mean_one_thing():
    from aml.commands._options import MULTISCALE_TEXT, parse_scales
    from aml.whiten import FIRST

    assert parse_scales(MULTISCALE_TEXT) == MULTISCALE
    for name in ("extract", "evaluate", "embed"):
        ms = _options(_command(name))["scales"]
        assert ms.flag_value == MULTISCALE_TEXT and ms.opts == ["--multiscale"]
    for name in ("extract", "evaluate", "export"):
        w = _options(_command(name))["whiten"]
        assert w.flag_value == FIRST and not w.is_flag and "learned whitening Lw" in w.help
        assert "lw_dataset" not in _options(_command(name))
    for name in ("extract", "evaluate"):
        b = _options(_command(name))["batch_size"]
        assert f"at most {CPU_BATCH} on the CPU" in b.help and "Images per forward" in b.help
    for name in ("evaluate", "distill"):
        assert "cache_dtype" in _options(_command(name))


def test_commands_import_no_sibling_command_and_help_comes_from_docstrings():
    from aml import cli

    for name in COMMANDS:
        src = (REPO / "aml" / "commands" / f"{name}.py").read_text()
        siblings = set(re.findall(r"from aml\.commands\.(\w+)", src)) - {"_options", "_push"}  # _push: `aml index push`
        assert not siblings, (name, siblings)
    assert tuple(cli.COMMANDS) == COMMANDS
    assert cli.short_help("extract") == "Embed a list of images with a model or checkpoint into an .npy file."


def test_image_sizes_follow_the_artefact(tmp_path):
    """Queries at the size the student records (a checkpoint's test, else training size; an export's sidecar),
    the database at the index's, else the queries'; each option wins over what is recorded; the line says why."""
    import torch
    from conftest import valid_sidecar

    from aml.commands._options import image_sizes
    from aml.identity import recorded_image_size
    from aml.sidecar import write_sidecar

    torch.save({"config": {"image_size": 224, "test_image_size": None}}, tmp_path / "a.pt")
    torch.save({"config": {"image_size": 224, "test_image_size": 362}}, tmp_path / "b.pt")
    torch.save({"state_dict": {}}, tmp_path / "c.pt")
    (tmp_path / "e.onnx").write_bytes(b"")
    write_sidecar(tmp_path / "e.onnx", {**valid_sidecar(), "image_size": 128})
    assert recorded_image_size(str(tmp_path / "a.pt")) == (224, "the checkpoint")
    assert recorded_image_size(str(tmp_path / "b.pt")) == (362, "the checkpoint")
    assert recorded_image_size(str(tmp_path / "c.pt")) == (None, "")
    assert recorded_image_size(str(tmp_path / "e.onnx")) == (128, "its sidecar")
    assert recorded_image_size("lite0") == (None, "")

    a = str(tmp_path / "a.pt")
    assert image_sizes(a, fallback=1024) == (
        224,
        224,
        "queries at 224 px (from the checkpoint), database at 224 px (as the queries)",
    )
    assert image_sizes(a, index_size=512, fallback=1024)[1:] == (
        512, "queries at 224 px (from the checkpoint), database at 512 px (from the index)"
    )  # fmt: skip
    assert image_sizes("lite0", fallback=1024)[:2] == (1024, 1024)
    assert image_sizes(a, both=300, index_size=512, fallback=1)[:2] == (300, 300)
    assert image_sizes(a, query=100, database=200, both=300, fallback=1) == (
        100, 200, "queries at 100 px (--query-image-size), database at 200 px (--db-image-size)"
    )  # fmt: skip
