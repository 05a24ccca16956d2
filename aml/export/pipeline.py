"""`export_checkpoint`: a student checkpoint -> a verified ONNX / TorchScript query encoder + JSON sidecar.

Order: build the student from the checkpoint, swap export-friendly modules in, export into a temporary folder
beside the output, (int8) count its int8 kernels and time it against fp32 (`_int8_report`: a recommendation,
not a gate), verify (equivalence gate for fp32, retrieval gate for fp16 / int8), and only then move the
model and write the sidecar. A failed gate raises VerificationError with the numbers and leaves nothing.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import aml
from aml.cache import DEFAULT_DTYPE
from aml.data.images import load_image, to_array
from aml.errors import UserError
from aml.export import verify
from aml.export.encoder import export_encoder, reference_encoder
from aml.export.formats import check_precision, install, require, sha256_path, verify_format
from aml.export.mobile import MOBILE_FORMATS
from aml.export.onnx_export import OPSET, check_onnx, export_onnx
from aml.export.torchscript_export import export_torchscript, load_torchscript
from aml.io import sha256_file
from aml.net import RetrievalNet
from aml.onnx_embed import embed_images, l2n, session
from aml.settings import ExtractSettings
from aml.sidecar import CALIB_COUNT, FORMATS, LATENCY_RUNS, PRECISIONS, binary_output, write_sidecar
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
        from aml.registry import read_torch_file

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
    from aml.data.revisitop import load_revisitop
    from aml.identity import check_compatible
    from aml.io import aml_home
    from aml.teacher_vectors import TeacherVectors

    if verify_data is not None:
        root = Path(verify_data)
        ds = load_revisitop(root.parent, root.name)
    else:
        from aml.data.spec import parse_data_spec

        if "data" not in config:
            raise UserError(
                f"{where}: no training config to find a test set in; pass --verify-data DIR/NAME "
                "(a revisitop-layout dataset)"
            )
        test = parse_data_spec(config["data"]).test
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
) -> dict[str, Any]:
    ds = vd.dataset
    kw = dict(image_size=image_size, mean=mean, std=std, bbxs=ds.bbxs)
    q_ref = embed_images(torch_runner(reference), ds.query_paths(), **kw)
    q_exp = embed_images(exported, ds.query_paths(), **kw)
    return verify.retrieval(ds, vd.db, q_ref, q_exp, tolerance=tolerance)


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
    from aml.data.spec import parse_data_spec

    return parse_data_spec(config["data"]).train.paths


def _export_graph(
    fmt: str,
    precision: str,
    module: torch.nn.Module,
    example: torch.Tensor,
    tmp: Path,
    calibration: Callable[[], list[np.ndarray]],
) -> tuple[Path, verify.Runner]:
    """Export `module` into `tmp` (int8: fp32 ONNX, then quantised on `calibration()` batches); returns the
    model file and a runner of it."""
    model = tmp / f"model{FORMATS[fmt]}"
    if fmt == "torchscript":
        export_torchscript(module, model, example)
        return model, torch_runner(load_torchscript(model))
    fp32_path = tmp / "fp32.onnx" if precision == "int8" else model
    export_onnx(module, fp32_path, example)
    if precision == "int8":
        from aml.export.quantize import quantize_int8

        quantize_int8(fp32_path, model, calibration())
    check_onnx(model)
    return model, ort_runner(model)


def _int8_report(fp32: Path, model: Path, size: int, runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    """What the int8 graph buys: its int8 / float kernels as onnxruntime runs them and, with `runs` > 0, the
    paired fp32 / int8 latency at `size` and the precision recommended from it."""
    from dataclasses import asdict

    from aml.export import quant_report
    from aml.export.quantize import Int8Recipe

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
    fmt: str,
    precision: str,
    out: Path,
    net: RetrievalNet,
    reference: torch.nn.Module,
    lw: Lw | None,
    size: int,
    swaps: dict[str, int],
    ckpt_path: Path,
    ckpt: Mapping[str, Any],
    results: dict[str, Any],
) -> dict[str, Any]:
    """The sidecar of an export (everything but the model file's sha256)."""
    info_aml = net.meta.get("aml") or {}
    return {
        "format": fmt,
        "precision": precision,
        "file": out.name,
        "mean": net.mean,
        "std": net.std,
        "input": {
            "name": "images",
            "layout": "NCHW RGB",
            "dtype": "float32",
            "dynamic": ["batch", "height", "width"],
        },
        "output": {"name": "vectors", "dtype": "float32", "l2_normalised": True},
        "image_size": size,
        "dim": int(reference.lw.out_features if lw is not None else net.dim),
        "msp": 1.0 if lw is not None else float(net.msp),
        "whiten": None if lw is None else {"folded": "teacher Lw", "variant": lw.variant, "dataset": lw.key},
        "teacher": info_aml.get("teacher"),
        "student": {
            "name": info_aml.get("name"),
            "checkpoint": str(ckpt_path.resolve()),
            "sha256": sha256_file(ckpt_path),
            "epoch": ckpt.get("epoch"),
        },
        "export": {
            "exporter": "torch.onnx.export(dynamo=False)" if fmt == "onnx" else "torch.jit.trace",
            "opset": OPSET if fmt == "onnx" else None,
            "traced_at": [size, size],
            "swapped_modules": swaps,
            "torch": torch.__version__,
            "aml": aml.__version__,
        },
        "verification": results,
    }


def export_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    fmt: str = "onnx",
    precision: str = "fp32",
    whiten: str | None = None,
    out: str | os.PathLike | None = None,
    image_size: int | None = None,
    verify_data: str | None = None,
    calib_images: Sequence[str] | None = None,
    calib_count: int = CALIB_COUNT,
    map_tolerance: float = verify.MAP_TOLERANCE,
    latency_runs: int = LATENCY_RUNS,
    verify_data_fn: Callable[..., VerifyData] | None = None,
    binary: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Export, verify and write `out` (+ `out.json` sidecar); returns the sidecar dict.

    int8 also records (sidecar `int8`) how many convolutions onnxruntime runs as int8 kernels and, unless
    `latency_runs` is 0, the paired batch-1 fp32 / int8 latency at the export's size: when int8 takes more
    than `aml.sidecar.MAX_INT8_RATIO` of the fp32 time, it says so and recommends fp32 (the model is
    still written).

    `whiten` (a `--whiten` value: `aml.whiten.FIRST`, a key of the teacher's meta['Lw'], or an Lw file) folds
    the teacher's single-scale Lw into the graph. The image size is `image_size`, else the checkpoint's test or
    training size, else TrainConfig's default. `verify_data_fn(config, verify_data, identity, image_size, lw,
    where)` overrides where the held-out set and the teacher database come from (tests pass tiny arrays).
    `binary` records in the sidecar (`output.binary`, aml.sidecar.binary_output) that the float vectors are to be
    binarised at zero by the consumer (`aml embed` writes packed codes); the graph is the float one.
    """
    from aml.registry import create_model, read_torch_file
    from aml.train.config import TrainConfig

    _check_choices(fmt, precision)
    ckpt_path = Path(checkpoint)
    where = str(ckpt_path)
    ckpt = read_torch_file(ckpt_path)
    config = _config(ckpt) if isinstance(ckpt, Mapping) else {}
    net = create_model(ckpt_path, role="student").eval().requires_grad_(False)
    info_aml = net.meta.get("aml") or {}
    teacher = info_aml.get("teacher")
    size = int(image_size or config.get("test_image_size") or config.get("image_size") or TrainConfig.image_size)
    suffix = f"-{precision}{'-w' if whiten is not None else ''}{'-b' if binary else ''}{FORMATS[fmt]}"
    out = Path(out) if out is not None else ckpt_path.with_name(f"{ckpt_path.stem}{suffix}")
    label = (teacher or {}).get("weights")
    lw = teacher_lw(whiten, False, _teacher_meta(teacher, where), where=f"teacher {label}")  # single-scale

    reference = reference_encoder(net, lw)
    module, swaps = export_encoder(net, lw, "fp32" if precision == "int8" or fmt == "coreml" else precision)
    example = torch.from_numpy(verify.probe_batch(size, size, seed=99, batch=1, mean=net.mean, std=net.std))

    def calibration() -> list[np.ndarray]:
        paths = _calibration_images(config, calib_images, where)
        batches = calibration_batches(paths, size, net.mean, net.std, calib_count)
        log(f"calibrating int8 on {len(batches)} images")
        return batches

    results: dict[str, Any] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        log(
            f"exporting {info_aml.get('name')} ({fmt}, {precision}) traced at {size}x{size}; "
            f"export-friendly swaps: {swaps or 'none needed'}"
        )
        int8 = mobile = None
        if fmt in MOBILE_FORMATS:  # aml.export.formats: export, then the format's own run (or structural check)
            tmp_model, mobile = Path(tmp) / f"model{FORMATS[fmt]}", MOBILE_FORMATS[fmt]
            details = mobile.export(module, size, precision, calibration, tmp_model)
            results["equivalence"], runner = verify_format(
                mobile, tmp_model, torch_runner(reference), size, gate=precision == "fp32",
                dim=int(reference.lw.out_features if lw is not None else net.dim), mean=net.mean, std=net.std,
            )  # fmt: skip
        else:
            tmp_model, runner = _export_graph(fmt, precision, module, example, Path(tmp), calibration)
            if precision == "int8":
                int8 = _int8_report(Path(tmp) / "fp32.onnx", tmp_model, size, latency_runs, log)
            results["equivalence"] = verify.equivalence(
                torch_runner(reference), runner, size, gate=precision == "fp32", mean=net.mean, std=net.std
            )
        if precision != "fp32" and runner is not None:
            vd = (verify_data_fn or default_verify_data)(config, verify_data, teacher or {}, size, lw, where)
            log(
                f"retrieval check on {vd.dataset.name}: {len(vd.dataset.qimlist)} queries, {vd.db.shape[0]} "
                "database vectors"
            )
            results["retrieval"] = _retrieval_gate(reference, runner, vd, size, net.mean, net.std, map_tolerance)
        failure = verify.failure_message(where, results)
        if failure:
            raise verify.VerificationError(failure)
        info = _sidecar_info(fmt, precision, out, net, reference, lw, size, swaps, ckpt_path, ckpt, results)
        if int8 is not None:
            info["int8"] = int8
        if mobile is not None:
            info["export"] |= {"opset": None, "traced_at": None if fmt == "executorch" else [size, size]} | details
        if binary:
            info["output"]["binary"] = binary_output(info["dim"])
        # The sidecar (with the new model's sha256) goes first: killed between the two renames, the old model
        # sits beside a sidecar naming another file's bytes, which `aml embed` refuses; never the reverse pair.
        info["sha256"] = sha256_path(tmp_model)
        write_sidecar(out, info)
        install(tmp_model, out)
    return info
