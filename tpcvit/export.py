"""ONNX export of TPC (and dense/timm) models, checked against PyTorch with onnxruntime.

Budget mode is the deployable form of TPC: every controlled block keeps exactly ``round(keep * N)`` patch tokens,
so every shape is static and the whole gather -> block -> scatter path is plain ONNX (TopK, Gather,
ScatterND) that onnxruntime runs without custom ops. Adaptive mode decides per image how many tokens stay
active, which makes shapes depend on the data; it is refused with a pointer to budget mode.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .bench import SpeedRow, speed_rows, time_interleaved
from .checkpoint import atomic_write, read_state_dict, unwrap
from .errors import TpcvitError
from .flops import count_gmacs
from .models import image_geometry
from .runtime import set_mode, tpc_modules

EXPORT_MODES = ("dense", "budget")


class ExportError(TpcvitError):
    """The exported graph is missing a dependency or does not reproduce the PyTorch model."""


@dataclass
class ExportReport:
    path: str
    mode: str
    keep: float | None
    input_shape: list[int]
    dynamic_batch: bool
    size_mb: float
    max_abs_diff: float | None  # onnxruntime vs PyTorch logits on the check inputs (None: not checked)
    checked_batches: list[int]


def _require(module: str, extra: str = "export"):
    try:
        return __import__(module)
    except ImportError as err:
        raise ExportError(f"{module} is not installed: pip install 'tpcvit[{extra}]' "
                          f"(or pip install {module})") from err


def classes_in_checkpoint(path: str | os.PathLike) -> int | None:
    """Class count of a checkpoint's classifier (timm ViT/LV-ViT ``head.weight``, Swin ``head.fc.weight``)."""
    state = read_state_dict(path)
    for key in ("head.weight", "head.fc.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


def prepare_for_export(model: nn.Module, mode: str, keep: float | None) -> nn.Module:
    """Eval mode and the chosen propagation mode; refuses modes whose shapes depend on the data."""
    if mode not in EXPORT_MODES:
        raise ExportError(
            f"mode {mode!r} cannot be exported: adaptive decisions give each image its own number of active "
            f"tokens (data-dependent shapes). Export mode='budget' with keep=<fraction> (static shapes) or "
            f"mode='dense'; valid: {EXPORT_MODES}")
    model = unwrap(model).eval()
    if tpc_modules(model):
        set_mode(model, mode, keep if mode == "budget" else None)
    elif mode != "dense":
        raise ExportError(f"{type(model).__name__} is not a TPC model: only mode='dense' applies")
    return model


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    mode: str = "budget",
    keep: float | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    check: bool = True,
    opset: int = 18,
) -> ExportReport:
    """Export ``model`` to ``path`` (one self-contained ``.onnx`` file, written atomically).

    With ``check`` the file is loaded in onnxruntime and its logits are compared with PyTorch's on random images
    at ``batch_size`` (and at another batch size when the batch axis is dynamic); a mismatch raises
    :class:`ExportError` and leaves no file behind.
    """
    _require("onnxscript")
    model = prepare_for_export(model, mode, keep)
    c, h, w = image_geometry(model)
    # a dynamic batch axis is traced at 2: torch.export specialises a size-1 example dimension to 1
    example = torch.randn(max(batch_size, 2) if dynamic_batch else batch_size, c, h, w)
    dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None

    batches = [batch_size] + ([batch_size + 2] if dynamic_batch else [])
    report = ExportReport(str(path), mode, keep, [batch_size, c, h, w], dynamic_batch, 0.0, None,
                          batches if check else [])

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export internals, not actionable here
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dynamic_shapes,
                                        input_names=["images"], output_names=["logits"], opset_version=opset,
                                        external_data=False, verbose=False)
        program.save(tmp)
        if check:
            report.max_abs_diff = check_onnx(model, tmp, report.checked_batches)

    out = atomic_write(path, write)
    report.size_mb = round(out.stat().st_size / 2**20, 2)
    return report


def ort_session(path: str | os.PathLike, threads: int = 0):
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_onnx(model: nn.Module, path: str | os.PathLike, batches: list[int], atol: float = 1e-3) -> float:
    """Max abs difference between onnxruntime and PyTorch logits on random images; raises above ``atol``
    (relative to the logits' scale)."""
    session = ort_session(path)
    c, h, w = image_geometry(model)
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for b in batches:
        x = torch.randn(b, c, h, w, generator=gen)
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        if got.shape != ref.shape:
            raise ExportError(f"onnxruntime returned logits {list(got.shape)}, PyTorch {list(ref.shape)}")
        diff = float((got - ref).abs().max())
        scale = max(1.0, float(ref.abs().max()))
        if not diff <= atol * scale:
            raise ExportError(f"exported model differs from PyTorch by {diff:.3g} at batch {b} "
                              f"(tolerance {atol * scale:.3g}); the file was not written")
        worst = max(worst, diff)
    return worst


def time_onnx(paths: dict[str, str | os.PathLike], batch: int, rounds: int = 5, iters: int | None = None,
              threads: int = 0, round_seconds: float = 0.5) -> dict[str, list[float]]:
    """Seconds per onnxruntime call of each named model, one sample per round, on the same random images.

    Rounds are interleaved across the models (a noisy machine slows all of them alike), after a warm-up; each
    round makes ``iters`` calls per model (default: as many as fill ``round_seconds`` for the slowest model).
    """
    sessions = {name: ort_session(p, threads) for name, p in paths.items()}
    c, h, w = (int(v) for v in next(iter(sessions.values())).get_inputs()[0].shape[1:])
    x = torch.randn(batch, c, h, w).numpy()
    fns = {name: (lambda s=s: s.run(None, {"images": x})) for name, s in sessions.items()}
    if iters is None:
        one = time_interleaved(fns, torch.device("cpu"), rounds=1, warmup=2, progress=False)
        iters = max(1, min(1000, round(round_seconds / max(max(t[0] for t in one.values()), 1e-6))))
    return time_interleaved(fns, torch.device("cpu"), rounds=rounds, iters=iters, warmup=1, progress=False)


def onnx_speed_rows(variants: dict[str, tuple[nn.Module, str, float | None, str | os.PathLike]],
                    batch_sizes: list[int], rounds: int = 5) -> list[SpeedRow]:
    """Time exported models against each other in onnxruntime (fp32, CPU); the first variant is the baseline.

    ``variants``: name -> ``(model, mode, keep, onnx path)``; GMACs come from the PyTorch model in that mode.
    """
    gmacs = {}
    for name, (model, mode, keep, _) in variants.items():
        prepare_for_export(model, mode, keep)
        gmacs[name] = count_gmacs(model, torch.randn(2, *image_geometry(model)))
    baseline, keeps = next(iter(variants)), {name: v[2] for name, v in variants.items()}
    rows: list[SpeedRow] = []
    for batch in batch_sizes:
        samples = time_onnx({name: v[3] for name, v in variants.items()}, batch, rounds)
        rows += speed_rows(samples, gmacs, batch, "float32", baseline, keeps)
    return rows


__all__ = ["EXPORT_MODES", "ExportError", "ExportReport", "check_onnx", "classes_in_checkpoint", "export_onnx",
           "onnx_speed_rows", "prepare_for_export", "time_onnx"]
