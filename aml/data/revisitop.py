"""Datasets in revisitop layout (revisited Oxford / Paris and anything written like them).

`DIR/NAME/gnd_NAME.pkl` holds `imlist` (database names, no extension), `qimlist` (query names) and `gnd`, one
dict per query with `bbx` [x1, y1, x2, y2] (pixels of the full image; optional here: missing means the whole
image), `easy`, `hard` and `junk` (0-based indices into `imlist`). Images are `DIR/NAME/jpg/<name>.jpg`.
Optional R1M-style distractors are a text file of image paths appended after `imlist`.
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aml.errors import UserError
from aml.io import atomic_write
from aml.trust import load_pickle

Bbx = tuple[float, float, float, float]
GND_KEYS = ("easy", "hard", "junk")


@dataclass(frozen=True)
class Revisitop:
    """A loaded, validated revisitop-layout dataset; `gnd[i]` has int lists `easy/hard/junk` and `bbx`."""

    root: Path  # DIR/NAME
    name: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]

    @property
    def gnd_path(self) -> Path:
        return self.root / f"gnd_{self.name}.pkl"

    @property
    def bbxs(self) -> list[Bbx | None]:
        """Query crop boxes (None: the whole image), in `qimlist` order."""
        return [g["bbx"] for g in self.gnd]

    def image_path(self, name: str) -> str:
        return str(self.root / "jpg" / f"{name}.jpg")

    def db_paths(self) -> list[str]:
        """Database image paths in `imlist` order."""
        return [self.image_path(n) for n in self.imlist]

    def query_paths(self) -> list[str]:
        """Query image paths (uncropped; crop with `bbxs`) in `qimlist` order."""
        return [self.image_path(n) for n in self.qimlist]

    def check_images(self, extra: Sequence[str] = ()) -> None:
        """Raise a UserError saying how many images (database, queries, `extra`) are missing, and which."""
        paths = list(dict.fromkeys([*self.db_paths(), *self.query_paths(), *extra]))
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            first = ", ".join(missing[:5])
            raise UserError(
                f"{self.root / 'jpg'}: {len(missing)} of {len(paths)} images are missing (first: "
                f"{first}); put the images as jpg/<name>.jpg beside {self.gnd_path.name}"
            )


def _index_list(value: Any, n_db: int, where: str) -> list[int]:
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise UserError(f"{where}: expected a list of database indices, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise UserError(f"{where}: {v!r} is not an integer; indices are 0-based positions in imlist")
        i = int(v)
        if not 0 <= i < n_db:
            raise UserError(f"{where}: index {i} is outside imlist (0..{n_db - 1}); indices are 0-based")
        out.append(i)
    if len(set(out)) != len(out):
        raise UserError(f"{where}: repeated indices; list each database image once")
    return out


def _bbx(value: Any, where: str) -> Bbx | None:
    if value is None:
        return None
    try:
        b = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected [x1, y1, x2, y2] numbers, got {value!r}") from None
    if len(b) != 4 or not all(math.isfinite(v) for v in b) or b[2] <= b[0] or b[3] <= b[1]:
        raise UserError(f"{where}: {list(value)!r} is not a box [x1, y1, x2, y2] with x1 < x2, y1 < y2")
    return b


def _names(value: Any, where: str) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise UserError(f"{where}: expected a list of image names, got {type(value).__name__}")
    bad = [i for i, v in enumerate(value) if not isinstance(v, str) or not v]
    if bad:
        raise UserError(f"{where}[{bad[0]}]: {value[bad[0]]!r} is not an image name (a non-empty string)")
    return list(value)


def validate_gnd(obj: Any, where: str) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Check a gnd object; normalise it to (imlist, qimlist, gnd with int lists and a bbx tuple or None)."""
    if not isinstance(obj, Mapping):
        raise UserError(f"{where}: expected a dict with imlist, qimlist and gnd, got {type(obj).__name__}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in obj:
            raise UserError(
                f"{where}: missing key '{key}' (found {sorted(map(str, obj))}); "
                "a revisitop gnd file has imlist, qimlist and gnd"
            )
    imlist, qimlist = _names(obj["imlist"], f"{where}: imlist"), _names(obj["qimlist"], f"{where}: qimlist")
    gnd = obj["gnd"]
    if not isinstance(gnd, Sequence) or len(gnd) != len(qimlist):
        n = len(gnd) if isinstance(gnd, Sequence) else type(gnd).__name__
        raise UserError(f"{where}: gnd has {n} entries but qimlist has {len(qimlist)} queries; one per query")
    out = []
    for i, g in enumerate(gnd):
        at = f"{where}: gnd[{i}] (query {qimlist[i]})"
        if not isinstance(g, Mapping):
            raise UserError(f"{at}: expected a dict with easy, hard, junk, bbx, got {type(g).__name__}")
        missing = [k for k in GND_KEYS if k not in g]
        if missing:
            raise UserError(f"{at}: missing key '{missing[0]}'; each query needs easy, hard and junk lists")
        out.append(
            {
                **{k: _index_list(g[k], len(imlist), f"{at}: {k}") for k in GND_KEYS},
                "bbx": _bbx(g.get("bbx"), f"{at}: bbx"),
            }
        )
    return imlist, qimlist, out


def gnd_file(data_root: str | os.PathLike, name: str) -> Path:
    """Where the ground truth of dataset `name` lives under `data_root`."""
    return Path(data_root) / name / f"gnd_{name}.pkl"


def load_revisitop(data_root: str | os.PathLike, name: str) -> Revisitop:
    """Read and validate `data_root/name/gnd_name.pkl` (images are checked separately: `check_images`)."""
    path = gnd_file(data_root, name)
    if not path.is_file():
        found = sorted(str(p.relative_to(data_root)) for p in Path(data_root).glob("*/gnd_*.pkl"))
        hint = f" (found: {', '.join(found)})" if found else ""
        raise UserError(
            f"{path}: ground-truth file not found{hint}; expected "
            f"DATA_ROOT/{name}/gnd_{name}.pkl (e.g. gnd_roxford5k.pkl from the revisitop site)"
        )
    obj = load_pickle(path, encoding="latin1")  # dicts, lists, numbers, numpy arrays: nothing that runs code
    imlist, qimlist, gnd = validate_gnd(obj, str(path))
    return Revisitop(path.parent, name, imlist, qimlist, gnd)


def write_revisitop(
    root: str | os.PathLike, name: str, imlist: Sequence[str], qimlist: Sequence[str], gnd: Sequence[Mapping[str, Any]]
) -> Path:
    """Validate and atomically write `root/name/gnd_name.pkl` (plain lists and floats, like the originals)."""
    path = gnd_file(root, name)
    imlist, qimlist, norm = validate_gnd(
        {"imlist": list(imlist), "qimlist": list(qimlist), "gnd": list(gnd)}, str(path)
    )
    out = [{**{k: g[k] for k in GND_KEYS}, **({"bbx": list(g["bbx"])} if g["bbx"] is not None else {})} for g in norm]
    (path.parent / "jpg").mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": out}, f, protocol=4)
    return path
