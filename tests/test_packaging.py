"""What installs: the library, its backbone families and its CLI under the `aml` namespace, nothing top-level."""

from __future__ import annotations

import configparser
import re
import sys

import setuptools
from conftest import REPO

from aml import registry


def _options() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg["options"]


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.strip().splitlines() if line.strip()]


def test_every_package_installs_under_aml():
    options = _options()
    packages = _lines(options["packages"])
    mapped = dict(line.replace(" ", "").split("=") for line in _lines(options["package_dir"]))
    assert mapped == {"aml.teachers": "teachers", "aml.students": "students"}
    found = setuptools.find_packages(str(REPO), include=["aml", "aml.*"])
    assert sorted(packages) == sorted([*found, *mapped]), "setup.cfg's packages list misses a package"
    assert all(p == "aml" or p.startswith("aml.") for p in packages)
    assert "py_modules" not in options


def test_the_console_script_is_the_installed_cli():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert _lines(cfg["options.entry_points"]["console_scripts"]) == ["aml = aml.cli:main"]
    assert re.search(r"^from aml\.cli import .*\bmain\b", (REPO / "cli.py").read_text(), flags=re.M)


def test_the_registry_loads_the_families_by_their_installed_names():
    registry._entries()
    assert {"aml.teachers.resnet", "aml.teachers.vgg", "aml.students.efficientnet", "aml.students.mobilenet"} <= set(
        sys.modules
    )
    assert "teachers" not in sys.modules and "students" not in sys.modules
