"""`export_checkpoint`: a student checkpoint -> a verified ONNX / TorchScript query encoder + JSON sidecar.

Order: build the student from the checkpoint, swap export-friendly modules in, export into a temporary folder
beside the output, (int8) count its int8 kernels and time it against fp32 (`_int8_report`: a recommendation,
not a gate), verify (equivalence gate for fp32, retrieval gate for fp16 / int8), and only then move the
model and write the sidecar. A failed gate raises VerificationError with the numbers and leaves nothing.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

import aml
from aml.cache import DEFAULT_DTYPE
from aml.data.images import load_image, to_array
from aml.data.revisitop import load_revisitop
from aml.data.sources import parse_data_specs
from aml.errors import UserError
from aml.export import quant_report, verify
from aml.export.encoder import export_encoder, reference_encoder
from aml.export.formats import check_precision, install, require, sha256_path, verify_format
from aml.export.mobile import MOBILE_FORMATS
from aml.export.onnx_export import OPSET, check_onnx, export_onnx
from aml.export.quantize import Int8Recipe, quantize_int8
from aml.export.torchscript_export import export_torchscript, load_torchscript
from aml.identity import check_compatible, recorded_image_size
from aml.io import aml_home, scratch_dir, sha256_file
from aml.net import RetrievalNet
from aml.onnx_embed import embed_images, l2n, session
from aml.probe import probe_batch
from aml.pte_embed import MAX_BATCH, MIN_SIDE
from aml.registry import create_model, read_torch_file
from aml.settings import IMAGE_SIZE, ExtractSettings
from aml.sidecar import (
    CALIB_COUNT,
    FORMATS,
    INPUT,
    LATENCY_RUNS,
    OUTPUT,
    PRECISIONS,
    binary_output,
    pad_static,
    preprocessing,
    write_sidecar,
)
from aml.teacher_vectors import TeacherVectors
from aml.whiten import Lw, teacher_lw


@dataclass
class VerifyData:
    """What the retrieval gate needs: a revisitop-layout dataset and the teacher's database vectors."""

    dataset: Any  # aml.data.revisitop.Revisitop
    db: np.ndarray  # (N_db, D) teacher vectors (teacher's Lw applied when exporting with --whiten)


def torch_runner(module: torch.nn.Module) -> verify.Runner:
    """numpy batch -> numpy vectors through a PyTorch module (CPU, no grad)."""

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x))).float().numpy()

    return run


def ort_runner(path: str | os.PathLike) -> verify.Runner:
    """numpy batch -> numpy vectors through an ONNX file on onnxruntime (CPU)."""
    sess = session(path)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _teacher_meta(identity: Mapping[str, Any] | None, where: str) -> Callable[[], Mapping[str, Any]]:
    """Reads the teacher's meta (for its meta['Lw']) from the weights file the student's meta names."""
    label = (identity or {}).get("weights")

    def meta() -> Mapping[str, Any]:
        if not label or not os.path.isfile(str(label)):
            raise UserError(
                f"{where}: --whiten needs the teacher's learned whitening, but "
                f"meta['aml']['teacher'] names weights {label!r}, not a checkpoint file with "
                "meta['Lw']; pass --whiten FILE (a whitening file) or drop --whiten"
            )
        obj = read_torch_file(label)
        found = obj.get("meta") if isinstance(obj, Mapping) else None
        return found if isinstance(found, Mapping) else {}

    return meta


def _config(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    cfg = ckpt.get("config")
    return dict(cfg) if isinstance(cfg, Mapping) else {}


def default_verify_data(
    config: Mapping[str, Any],
    verify_data: str | None,
    identity: Mapping[str, Any],
    image_size: int,
    lw: Lw | None,
    where: str,
) -> VerifyData:
    """The held-out set (`verify_data` = DIR/NAME in revisitop layout, else the training data's test
    split) and the teacher's database vectors for it, from the teacher feature cache (extracted once)."""

    if verify_data is not None:
        root = Path(verify_data)
        ds = load_revisitop(root.parent, root.name)
    else:
        if "data" not in config:
            raise UserError(
                f"{where}: no training config to find a test set in; pass --verify-data DIR/NAME "
                "(a revisitop-layout dataset)"
            )
        test = parse_data_specs(config["data"], config.get("test_data")).test
        if test is None:
            raise UserError(f"{where}: training data '{config['data']}' has no test split; pass --verify-data DIR/NAME")
        ds = load_revisitop(*test)
    ds.check_images()
    label = str(identity.get("weights"))
    tv = TeacherVectors(
        str(identity["name"]),
        ExtractSettings(image_size, progress=False),
        cache_dir=aml_home() / "cache",
        weights=label if os.path.isfile(label) else None,
        random_init=label == "random-init",
        dtype=config.get("cache_dtype", DEFAULT_DTYPE),
    )
    check_compatible(  # the gate's database must be the teacher the student was distilled for
        dict(identity), tv.identity, what=f"{where}: distilled for teacher", where="the teacher found now is",
        fix="restore the teacher's weights file the student records",
    )  # fmt: skip
    db = np.asarray(tv.get(ds.db_paths()), dtype=np.float32)
    db = l2n(db).astype(np.float32)  # float16 cache rows back to unit length
    return VerifyData(ds, lw.apply_np(db) if lw is not None else db)


def calibration_batches(
    paths: Sequence[str],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    count: int = CALIB_COUNT,
    seed: int = 0,
) -> list[np.ndarray]:
    """`count` images drawn at random (fixed seed) from `paths`, loaded and normalised as (1, 3, H, W)."""
    chosen = random.Random(seed).sample(list(paths), min(count, len(paths)))
    return [to_array(load_image(p, image_size), mean, std)[None] for p in chosen]


def _retrieval_gate(
    reference: torch.nn.Module,
    exported: verify.Runner,
    vd: VerifyData,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    tolerance: float,
    static_shape: bool = False,
) -> dict[str, Any]:
    ds = vd.dataset
    kw = dict(image_size=image_size, mean=mean, std=std, bbxs=ds.bbxs)
    ref = torch_runner(reference)
    if static_shape:  # both see the padded input the static model takes (aml.sidecar.STATIC_PAD)
        ref, exported = _padded(ref, image_size), _padded(exported, image_size)
    q_ref = embed_images(ref, ds.query_paths(), **kw)
    q_exp = embed_images(exported, ds.query_paths(), **kw)
    return verify.retrieval(ds, vd.db, q_ref, q_exp, tolerance=tolerance)


def _padded(run: verify.Runner, size: int) -> verify.Runner:
    """`run` on batches padded to size x size, as a static-shape model takes them."""
    return lambda x: run(pad_static(x, size))


def _check_choices(fmt: str, precision: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if fmt in MOBILE_FORMATS:
        check_precision(MOBILE_FORMATS[fmt], precision)
        require(MOBILE_FORMATS[fmt])
    if fmt == "torchscript" and precision == "int8":
        raise UserError(
            "--format torchscript --precision int8: int8 is quantised with onnxruntime; use --format onnx for int8"
        )


def _calibration_images(config: Mapping[str, Any], calib_images: Sequence[str] | None, where: str) -> Sequence[str]:
    """The int8 calibration list: the given one, else the training images of the checkpoint's config."""
    if calib_images is not None:
        return calib_images
    if "data" not in config:
        raise UserError(f"{where}: no training config to take calibration images from; pass --calib-images LIST.txt")
    return parse_data_specs(config["data"], config.get("test_data")).train.paths


def _export_graph(
    fmt: str,
    precision: str,
    module: torch.nn.Module,
    example: torch.Tensor,
    tmp: Path,
    calibration: Callable[[], list[np.ndarray]],
    static_shape: bool = False,
) -> tuple[Path, verify.Runner]:
    """Export `module` into `tmp` (int8: fp32 ONNX, then quantised on `calibration()` batches); returns the
    model file and a runner of it."""
    model = tmp / f"model{FORMATS[fmt]}"
    if fmt == "torchscript":
        export_torchscript(module, model, example)
        return model, torch_runner(load_torchscript(model))
    fp32_path = tmp / "fp32.onnx" if precision == "int8" else model
    export_onnx(module, fp32_path, example, static_shape=static_shape)
    if precision == "int8":
        quantize_int8(fp32_path, model, calibration())
    check_onnx(model)
    return model, ort_runner(model)


def _int8_report(fp32: Path, model: Path, size: int, runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    """What the int8 graph buys: its int8 / float kernels as onnxruntime runs them and, with `runs` > 0, the
    paired fp32 / int8 latency at `size` and the precision recommended from it."""
    kernels = quant_report.kernel_counts(model)
    total = quant_report.kernel_counts(fp32)["float_conv"]
    recipe = asdict(Int8Recipe())
    report: dict[str, Any] = {
        "recipe": recipe | {"ops": list(recipe["ops"])},
        "kernels": kernels,
        "convolutions": total,
    }
    log(
        f"int8 kernels: {kernels['int8_conv']} of {total} convolutions run as int8 (float: "
        f"{kernels['float_conv']}); {kernels['quantize']} Quantize / {kernels['dequantize']} Dequantize left"
    )
    if runs <= 0:
        return report | {"latency": None, "recommend": None, "message": "int8 latency not measured"}
    latency = quant_report.paired_latency(fp32, model, size, runs)
    verdict = quant_report.int8_verdict(latency)
    log(verdict["message"])
    return report | {"latency": latency} | verdict


def _sidecar_info(
    st: ExportSettings,
    student: _Student,
    out: Path,
    reference: torch.nn.Module,
    lw: Lw | None,
    size: int,
    swaps: dict[str, int],
    results: dict[str, Any],
) -> dict[str, Any]:
    """The sidecar of an export (everything but the model file's sha256)."""
    net, info_aml = student.net, student.info
    dim = int(reference.lw.out_features if lw is not None else net.dim)
    return {
        "format": st.fmt,
        "precision": st.precision,
        "file": out.name,
        "mean": net.mean,
        "std": net.std,
        "input": {
            "name": INPUT,
            "layout": "NCHW RGB",
            "dtype": "float32",
            "dynamic": ["batch"] if st.static_shape else ["batch", "height", "width"],
        },
        "output": {"name": OUTPUT, "dtype": "float32", "l2_normalised": True},
        "preprocessing": preprocessing(
            size,
            net.mean,
            net.std,
            dim,
            static_shape=st.static_shape,
            whitened=lw is not None,
            bounds=_bounds(st, size),
        ),
        "gates": {
            "equivalence": {"min_cosine": verify.MIN_COSINE, "max_abs_diff": verify.MAX_ABS_DIFF},
            "map_tolerance": st.map_tolerance,
        },
        "image_size": size,
        "dim": dim,
        "msp": 1.0 if lw is not None else float(net.msp),
        "whiten": None if lw is None else {"folded": "teacher Lw", "variant": lw.variant, "dataset": lw.key},
        "teacher": info_aml.get("teacher"),
        "student": {
            "name": info_aml.get("name"),
            "checkpoint": str(student.path.resolve()),
            "sha256": sha256_file(student.path),
            "epoch": student.ckpt.get("epoch"),
        },
        "export": {
            "exporter": "torch.onnx.export(dynamo=False)" if st.fmt == "onnx" else "torch.jit.trace",
            "opset": OPSET if st.fmt == "onnx" else None,
            "traced_at": [size, size],
            "swapped_modules": swaps,
            "torch": torch.__version__,
            "aml": aml.__version__,
        },
        "verification": results,
    }


def _bounds(st: ExportSettings, size: int) -> dict[str, list[int | None]]:
    """The batch and image-side limits of the exported model ([low, high]; None: no limit)."""
    if st.fmt in ("executorch", "coreml"):  # memory planned / flexible shapes up to the bounds
        side: list[int | None] = [size, size] if st.static_shape else [MIN_SIDE, max(size, MIN_SIDE + 1)]
        return {"batch": [1, MAX_BATCH], "side": side}
    return {"batch": [1, None], "side": [size, size] if st.static_shape else [1, None]}


@dataclass(frozen=True)
class ExportSettings:
    """What an export writes and how it is checked (the `aml export` options).

    `fmt` (FORMATS) and `precision` (PRECISIONS); `whiten` (a `--whiten` value: `aml.whiten.FIRST`, a key of the
    teacher's meta['Lw'], or an Lw file) folds the teacher's single-scale Lw into the graph; `image_size`: None
    takes the checkpoint's test or training size, else `aml.settings.IMAGE_SIZE`; `db_image_size`: the
    retrieval gate's teacher database at another size than the queries (None: the queries' size); `binary`
    records in the sidecar (`output.binary`, `aml.sidecar.binary_output`) that the consumer binarises the float
    vectors at zero (the graph stays float). fp16 / int8: `verify_data` (DIR/NAME, revisitop layout; None: the training
    data's test split) and `map_tolerance` for the retrieval gate; int8: `calib_images` (None: the training
    images), `calib_count` of them drawn, `latency_runs` paired fp32 / int8 timings (0: none). `static_shape`
    fixes the input's height and width to the image size (batch stays dynamic); the sidecar's `preprocessing`
    then says to pad images to it (`aml.sidecar.STATIC_PAD`), and the gates run on padded inputs.
    """

    fmt: str = "onnx"
    precision: str = "fp32"
    whiten: str | None = None
    image_size: int | None = None
    db_image_size: int | None = None
    binary: bool = False
    verify_data: str | None = None
    calib_images: Sequence[str] | None = None
    calib_count: int = CALIB_COUNT
    map_tolerance: float = verify.MAP_TOLERANCE
    latency_runs: int = LATENCY_RUNS
    static_shape: bool = False

    def __post_init__(self) -> None:
        _check_choices(self.fmt, self.precision)
        if self.static_shape and self.fmt == "torchscript":
            raise UserError("--format torchscript --static-shape: a traced TorchScript module has no input shape; "
                            "drop --static-shape or use --format onnx")  # fmt: skip
        if not self.map_tolerance >= 0:
            raise UserError(f"--map-tolerance {self.map_tolerance}: expected points >= 0, e.g. 1.0")

    def file_suffix(self) -> str:
        """The default output name's ending, e.g. `-int8-w-b.onnx` (precision, whitened, binary, format)."""
        whitened, binary = "-w" if self.whiten is not None else "", "-b" if self.binary else ""
        static = "-s" if self.static_shape else ""
        return f"-{self.precision}{whitened}{binary}{static}{FORMATS[self.fmt]}"


@dataclass(frozen=True)
class _Student:
    """A student checkpoint read for export: its file, network (eval mode, frozen), dict and training config."""

    path: Path
    net: RetrievalNet
    ckpt: Mapping[str, Any]
    config: dict[str, Any]

    @classmethod
    def read(cls, checkpoint: str | os.PathLike) -> _Student:
        path = Path(checkpoint)
        ckpt = read_torch_file(path)
        ckpt = ckpt if isinstance(ckpt, Mapping) else {}
        net = create_model(path, role="student").eval().requires_grad_(False)
        return cls(path, net, ckpt, _config(ckpt))

    @property
    def info(self) -> Mapping[str, Any]:
        """The student's meta['aml'] (its name and the teacher it was distilled for)."""
        return self.net.meta.get("aml") or {}

    def image_size(self, given: int | None) -> int:
        """`given`, else the checkpoint's test or training size (`aml.identity.recorded_image_size`), else
        `aml.settings.IMAGE_SIZE`."""
        return int(given or recorded_image_size(str(self.path))[0] or IMAGE_SIZE)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    settings: ExportSettings | None = None,
    *,
    out: str | os.PathLike | None = None,
    verify_data_fn: Callable[..., VerifyData] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Export, verify and write `out` (default: beside the checkpoint, `ExportSettings.file_suffix`) and its
    `out.json` sidecar, as `settings` say; returns the sidecar dict.

    int8 also records (sidecar `int8`) how many convolutions onnxruntime runs as int8 kernels and, unless
    `latency_runs` is 0, the paired batch-1 fp32 / int8 latency at the export's size: when int8 takes more
    than `aml.sidecar.MAX_INT8_RATIO` of the fp32 time, it says so and recommends fp32 (the model is
    still written). `verify_data_fn(config, verify_data, identity, image_size, lw, where)` overrides where the
    held-out set and the teacher database come from (tests pass tiny arrays).
    """
    st = settings or ExportSettings()
    student = _Student.read(checkpoint)
    net, where, teacher = student.net, str(student.path), student.info.get("teacher")
    size = student.image_size(st.image_size)
    out = Path(out) if out is not None else student.path.with_name(f"{student.path.stem}{st.file_suffix()}")
    label = (teacher or {}).get("weights")
    lw = teacher_lw(st.whiten, False, _teacher_meta(teacher, where), where=f"teacher {label}")  # single-scale
    reference = reference_encoder(net, lw)
    module, swaps = export_encoder(net, lw, "fp32" if st.precision == "int8" or st.fmt == "coreml" else st.precision)
    out.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(out) as tmp:
        log(
            f"exporting {student.info.get('name')} ({st.fmt}, {st.precision}) traced at {size}x{size}; "
            f"export-friendly swaps: {swaps or 'none needed'}"
        )
        example = torch.from_numpy(probe_batch(size, size, seed=99, batch=1, mean=net.mean, std=net.std))
        calibration = partial(_calibration, st, student, size, log)
        tmp_model, runner, equivalence, int8, details = _export_and_compare(
            st, module, reference, example, size, tmp, calibration, log
        )
        fetch = verify_data_fn or default_verify_data
        results = _verification(st, student, equivalence, reference, runner, size, lw, fetch, log)
        info = _sidecar_info(st, student, out, reference, lw, size, swaps, results)
        if int8 is not None:
            info["int8"] = int8
        if details is not None:
            traced = None if st.fmt == "executorch" else [size, size]
            info["export"] |= {"opset": None, "traced_at": traced} | details
        if st.binary:
            info["output"]["binary"] = binary_output(info["dim"])
        _write(out, tmp_model, info)
    return info


def _export_and_compare(
    st: ExportSettings,
    module: torch.nn.Module,
    reference: torch.nn.Module,
    example: torch.Tensor,
    size: int,
    tmp: Path,
    calibration: Callable[[], list[np.ndarray]],
    log: Callable[[str], None],
) -> tuple[Path, verify.Runner | None, dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """Write the model in `tmp` and compare it with torch on the probe images: (model path, its runner or None
    where this machine cannot run it, the equivalence result, the int8 report (ONNX int8), the on-device
    format's export fields (`aml.export.formats`))."""
    gate, mean, std = st.precision == "fp32", reference.net.mean, reference.net.std
    if st.fmt in MOBILE_FORMATS:  # the format's own export, then its run (or structural check)
        mobile = MOBILE_FORMATS[st.fmt]
        tmp_model = tmp / f"model{mobile.suffix}"
        details = mobile.export(module, size, st.precision, calibration, tmp_model, st.static_shape)
        dim = int(reference.lw.out_features if reference.lw is not None else reference.net.dim)
        equivalence, runner = verify_format(
            mobile, tmp_model, torch_runner(reference), size, gate=gate, dim=dim, mean=mean, std=std,
            static_shape=st.static_shape,
        )  # fmt: skip
        return tmp_model, runner, equivalence, None, details
    tmp_model, runner = _export_graph(st.fmt, st.precision, module, example, tmp, calibration, st.static_shape)
    equivalence = verify.equivalence(
        torch_runner(reference), runner, size, gate=gate, mean=mean, std=std, static_shape=st.static_shape
    )
    int8 = _int8_report(tmp / "fp32.onnx", tmp_model, size, st.latency_runs, log) if st.precision == "int8" else None
    return tmp_model, runner, equivalence, int8, None


def _calibration(st: ExportSettings, student: _Student, size: int, log: Callable[[str], None]) -> list[np.ndarray]:
    """The int8 calibration batches: `st.calib_count` images of the calibration list, loaded at `size` (padded
    to size x size for a static-shape graph, as every input it takes)."""
    paths = _calibration_images(student.config, st.calib_images, str(student.path))
    batches = calibration_batches(paths, size, student.net.mean, student.net.std, st.calib_count)
    if st.static_shape:
        batches = [pad_static(b, size) for b in batches]
    log(f"calibrating int8 on {len(batches)} images")
    return batches


def _verification(
    st: ExportSettings,
    student: _Student,
    equivalence: dict[str, Any],
    reference: torch.nn.Module,
    runner: verify.Runner | None,
    size: int,
    lw: Lw | None,
    verify_data_fn: Callable[..., VerifyData],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The verification results: the equivalence already measured (a gate for fp32) and, for fp16 / int8 of a
    model this machine runs, the retrieval gate; a failed gate raises VerificationError with the numbers."""
    net, where = student.net, str(student.path)
    results: dict[str, Any] = {"equivalence": equivalence}
    if st.precision != "fp32" and runner is not None:
        db_size = st.db_image_size or size
        vd = verify_data_fn(student.config, st.verify_data, student.info.get("teacher") or {}, db_size, lw, where)
        ds = vd.dataset
        log(f"retrieval check on {ds.name}: {len(ds.qimlist)} queries, {vd.db.shape[0]} database vectors")
        results["retrieval"] = _retrieval_gate(
            reference, runner, vd, size, net.mean, net.std, st.map_tolerance, st.static_shape
        )
    failure = verify.failure_message(where, results)
    if failure:
        raise verify.VerificationError(failure)
    return results


def _write(out: Path, tmp_model: Path, info: dict[str, Any]) -> None:
    """Move the verified model (a file, or an .mlpackage folder) to `out` and write its sidecar, recording the
    model's sha256."""
    # The sidecar (with the new model's sha256) goes first: killed between the two renames, the old model
    # sits beside a sidecar naming another file's bytes, which `aml embed` refuses; never the reverse pair.
    info["sha256"] = sha256_path(tmp_model)
    write_sidecar(out, info)
    install(tmp_model, out)
