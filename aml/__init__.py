"""aml: asymmetric teacher-student distillation for image retrieval."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# The backbone families live at the repository's top level (teachers/, students/) and install as aml.teachers and
# aml.students (setup.cfg's package_dir). Run from a source checkout, find them beside this package as well.
_SOURCE = _Path(__file__).resolve().parent.parent
if not (_Path(__path__[0]) / "teachers").is_dir() and (_SOURCE / "teachers" / "__init__.py").is_file():
    __path__.append(str(_SOURCE))
