"""`export_checkpoint`: a student checkpoint -> a verified ONNX / TorchScript query encoder + JSON sidecar.

Order: build the student from the checkpoint, swap export-friendly modules in, export into a temporary folder
beside the output, verify (equivalence gate for fp32, retrieval gate for fp16 / int8), and only then move the
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
from aml.errors import UserError
from aml.export import verify
from aml.export.encoder import export_encoder, reference_encoder
from aml.export.onnx_export import OPSET, check_onnx, export_onnx
from aml.export.sidecar import write_sidecar
from aml.export.torchscript_export import export_torchscript, load_torchscript
from aml.io import atomic_path, sha256_file
from aml.onnx_embed import embed_images, l2n, load_image, session, to_array

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
DEFAULT_IMAGE_SIZE = 362
CALIB_COUNT = 32


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


def teacher_lw(identity: Mapping[str, Any] | None, lw_dataset: str | None, where: str) -> tuple[str, dict[str, Any]]:
    """(dataset key, {'m', 'P'}): the teacher's single-scale learned whitening from its file's meta['Lw']."""
    from aml.extract import select_lw
    from aml.registry import read_torch_file

    label = (identity or {}).get("weights")
    if not label or not os.path.isfile(str(label)):
        raise UserError(
            f"{where}: --whiten needs the teacher's learned whitening, but "
            f"meta['aml']['teacher'] names weights {label!r}, not a checkpoint file with "
            "meta['Lw']; drop --whiten"
        )
    obj = read_torch_file(label)
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("Lw"), Mapping) or not meta["Lw"]:
        raise UserError(f"{label}: no meta['Lw'] (learned whitening) in the teacher file; drop --whiten")
    key = lw_dataset if lw_dataset is not None else next(iter(meta["Lw"]))
    return str(key), select_lw(meta, False, key)


def apply_lw_np(x: np.ndarray, lw: Mapping[str, Any]) -> np.ndarray:
    """x -> l2n(P (x - m)) on (N, D) numpy rows (the teacher side of the whitened asymmetric protocol)."""
    m = np.asarray(lw["m"], np.float32).reshape(1, -1)
    P = np.asarray(lw["P"], np.float32)
    return l2n((np.asarray(x, np.float32) - m) @ P.T).astype(np.float32)


def _config(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    cfg = ckpt.get("config")
    return dict(cfg) if isinstance(cfg, Mapping) else {}


def default_verify_data(
    config: Mapping[str, Any],
    verify_data: str | None,
    identity: Mapping[str, Any],
    image_size: int,
    lw: Mapping[str, Any] | None,
    where: str,
) -> VerifyData:
    """The held-out set (`verify_data` = DIR/NAME in revisitop layout, else the training data's test
    split) and the teacher's database vectors for it, from the teacher feature cache (extracted once)."""
    from aml.data.revisitop import load_revisitop
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
        weights=label if os.path.isfile(label) else None,
        random_init=label == "random-init",
        image_size=image_size,
        cache_dir=aml_home() / "cache",
        dtype=config.get("cache_dtype", "float16"),
        progress=False,
    )
    db = np.asarray(tv.get(ds.db_paths()), dtype=np.float32)
    db = l2n(db).astype(np.float32)  # float16 cache rows back to unit length
    return VerifyData(ds, apply_lw_np(db, lw) if lw is not None else db)


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


def export_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    fmt: str = "onnx",
    precision: str = "fp32",
    whiten: bool = False,
    lw_dataset: str | None = None,
    out: str | os.PathLike | None = None,
    image_size: int | None = None,
    verify_data: str | None = None,
    calib_images: Sequence[str] | None = None,
    calib_count: int = CALIB_COUNT,
    map_tolerance: float = verify.MAP_TOLERANCE,
    verify_data_fn: Callable[..., VerifyData] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Export, verify and write `out` (+ `out.json` sidecar); returns the sidecar dict.

    `verify_data_fn(config, verify_data, identity, image_size, lw, where)` overrides where the held-out set
    and the teacher database come from (tests pass tiny arrays).
    """
    from aml.registry import create_model, read_torch_file

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if precision not in ("fp32", "fp16", "int8"):
        raise UserError(f"--precision {precision}: expected fp32, fp16 or int8")
    if fmt == "torchscript" and precision == "int8":
        raise UserError(
            "--format torchscript --precision int8: int8 is quantised with onnxruntime; use --format onnx for int8"
        )
    ckpt_path = Path(checkpoint)
    where = str(ckpt_path)
    ckpt = read_torch_file(ckpt_path)
    config = _config(ckpt) if isinstance(ckpt, Mapping) else {}
    net = create_model(ckpt_path, role="student").eval().requires_grad_(False)
    info_aml = net.meta.get("aml") or {}
    teacher = info_aml.get("teacher")
    size = int(image_size or config.get("test_image_size") or config.get("image_size") or DEFAULT_IMAGE_SIZE)
    out = (
        Path(out)
        if out is not None
        else ckpt_path.with_name(f"{ckpt_path.stem}-{precision}{'-w' if whiten else ''}{FORMATS[fmt]}")
    )
    lw_key, lw = teacher_lw(teacher, lw_dataset, where) if whiten else (None, None)

    reference = reference_encoder(net, lw)
    module, swaps = export_encoder(net, lw, "fp32" if precision == "int8" else precision)
    example = torch.from_numpy(verify.probe_batch(size, size, seed=99, batch=1, mean=net.mean, std=net.std))
    results: dict[str, Any] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        tmp_model = Path(tmp) / f"model{FORMATS[fmt]}"
        log(
            f"exporting {info_aml.get('name')} ({fmt}, {precision}) traced at {size}x{size}; "
            f"export-friendly swaps: {swaps or 'none needed'}"
        )
        if fmt == "onnx":
            fp32_path = Path(tmp) / "fp32.onnx" if precision == "int8" else tmp_model
            export_onnx(module, fp32_path, example)
            if precision == "int8":
                if calib_images is None:
                    if "data" not in config:
                        raise UserError(
                            f"{where}: no training config to take calibration images from; pass --calib-images LIST.txt"
                        )
                    from aml.data.spec import parse_data_spec

                    calib_images = parse_data_spec(config["data"]).train.paths
                from aml.export.quantize import quantize_int8

                batches = calibration_batches(calib_images, size, net.mean, net.std, calib_count)
                log(f"calibrating int8 on {len(batches)} images")
                quantize_int8(fp32_path, tmp_model, batches)
            check_onnx(tmp_model)
            runner = ort_runner(tmp_model)
        else:
            export_torchscript(module, tmp_model, example)
            runner = torch_runner(load_torchscript(tmp_model))
        results["equivalence"] = verify.equivalence(
            torch_runner(reference), runner, size, gate=precision == "fp32", mean=net.mean, std=net.std
        )
        if precision != "fp32":
            fn = verify_data_fn or default_verify_data
            vd = fn(config, verify_data, teacher or {}, size, lw, where)
            log(
                f"retrieval check on {vd.dataset.name}: {len(vd.dataset.qimlist)} queries, {vd.db.shape[0]} "
                "database vectors"
            )
            results["retrieval"] = _retrieval_gate(reference, runner, vd, size, net.mean, net.std, map_tolerance)
        failure = verify.failure_message(where, results)
        if failure:
            raise verify.VerificationError(failure)
        info = {
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
            "whiten": None if lw is None else {"folded": "teacher Lw", "variant": "ss", "dataset": lw_key},
            "teacher": teacher,
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
        with atomic_path(out) as final:
            os.replace(tmp_model, final)
        info["sha256"] = sha256_file(out)
        write_sidecar(out, info)
    return info
