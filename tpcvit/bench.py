"""Honest timing: only the model, warm-up, synchronise, interleaved repeats, medians, hardware named.

Variants are timed round-robin (one timing of each variant per round), so slow drifts of a noisy machine hit
all variants alike; the reported number is the median over rounds.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from .config import ConfigError

STEADY_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value
_allocator_note = "default"


def steady_allocator() -> str:
    """Stop glibc from handing freed activation buffers back to the OS between forward passes (CPU timing).

    By default glibc serves mid-size blocks with ``mmap`` under a threshold it keeps adjusting, and trims the heap:
    a forward pass then page-faults its buffers back in, by a varying amount from process to process. Measured
    here (2-core EPYC): the main-job model at batch 256 ran 1473-1567 img/s dense without this and 1916-1949 with
    it; a depthwise conv on a freshly written input took 2.5 ms instead of 0.15 ms. Fixing the mmap threshold
    at 32 MiB and the trim threshold at 1 GiB (``mallopt``) removes that noise for every variant alike.
    Set ``TPCVIT_STEADY_MALLOC=0`` to measure with the default allocator. Idempotent; a no-op off glibc.
    """
    global _allocator_note
    if _allocator_note != "default" or os.environ.get("TPCVIT_STEADY_MALLOC", "1") == "0":
        return _allocator_note
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        if libc.mallopt(m_mmap_threshold, STEADY_MMAP_THRESHOLD) and libc.mallopt(m_trim_threshold, 2**30):
            _allocator_note = "glibc mallopt: mmap threshold 32 MiB, trim threshold 1 GiB"
    except (OSError, AttributeError):
        pass
    return _allocator_note


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What the numbers were measured on."""
    device = torch.device(device)
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    info["allocator"] = _allocator_note
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int,
    iters: int = 1,
    warmup: int = 2,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Seconds per call of each ``fn``, one sample per round, the variants interleaved within each round.

    Round ``r`` runs the variants in the order rotated by ``r`` (a Latin square over the rounds): a slot effect (the
    variant that runs right after another one, or first in the round, measured several percent faster or slower
    here at DeiT-S batch 32) then falls on every variant alike instead of biasing the paired ratios."""
    if device.type == "cpu":
        steady_allocator()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in tqdm(range(rounds), desc="timing rounds", disable=not progress, leave=False):
        for name, fn in _rotated(list(fns.items()), r):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / iters)
    return samples


def _rotated(items: list, shift: int) -> list:
    """``items`` rotated left by ``shift`` (mod its length)."""
    shift %= max(1, len(items))
    return items[shift:] + items[:shift]


# ATen ops that make the host wait for the device (their result's size or value is read on the host): on a GPU each
# one stalls the CPU until every queued kernel has run, and a CUDA graph cannot be captured across it
_SYNCING_OPS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::argwhere",
                          "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::bincount",
                          "aten::equal", "aten::is_nonzero"})


def _sync_kind(func, args: tuple) -> str | None:
    """The kind of host synchronisation ``func(*args)`` forces on a GPU, or ``None``."""
    name = func._schema.name
    if name in _SYNCING_OPS:
        return name
    if name == "aten::repeat_interleave" and func._overloadname != "self_int":  # tensor repeats: the size is read
        return name
    indices = args[1] if name.startswith("aten::index") and isinstance(args[1], (list, tuple)) else ()
    if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
        return f"{name} (boolean mask)"  # a hidden nonzero
    return None


class _HostSyncs(TorchDispatchMode):
    """Counts the ops that force a host synchronisation (:func:`_sync_kind`) as they run."""

    def __init__(self) -> None:
        super().__init__()
        self.found: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _sync_kind(func, args)
        if kind is not None:
            self.found[kind] += 1
        return func(*args, **(kwargs or {}))


def host_syncs(fn) -> Counter[str]:
    """Device -> host synchronisations of one ``fn()`` by kind (none = the pass can be captured in a CUDA graph and
    never stalls the CPU). Works on any device, CPU included: it counts the ops that would wait on a GPU, plus
    ``Tensor.tolist`` calls (read on the host without an ATen op). Runs under ``no_grad`` with inference mode off,
    also when called inside it (there ``.item()`` skips the dispatcher: a variant reading a scalar would pass as
    sync-free and be sent to a CUDA graph capture)."""
    mode = _HostSyncs()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        mode.found["Tensor.tolist"] += 1
        return tolist(self)

    with torch.inference_mode(False), torch.no_grad():
        fn()  # warm: caches built on a first call are not the steady state
        torch.Tensor.tolist = counted_tolist
        try:
            with mode:
                fn()
        finally:
            torch.Tensor.tolist = tolist
    return mode.found


def cuda_graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` captured once in a CUDA graph; the returned callable replays it (the same input memory, the outputs
    written into the same memory each time). At batch 1 on a GPU launching a forward's few hundred small kernels one
    by one costs more than running them; a replay launches them all at once. Needs a pass without host
    synchronisation (:func:`host_syncs`: budget mode and the fixed-budget peers) and with static shapes; warmed up on
    a side stream first (lazily built caches are not captured), as torch's CUDA graph recipe asks."""
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graph_variants(fns: dict[str, Callable[[], object]], device: torch.device
                   ) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """Every variant that can be captured replaced by its :func:`cuda_graphed` replay; the others stay eager, with
    the reason (their host synchronisations, or the capture's error)."""
    out, eager = dict(fns), {}
    for name, fn in fns.items():
        syncs = host_syncs(fn)
        if syncs:
            eager[name] = "host syncs: " + ", ".join(f"{k} x{v}" for k, v in sorted(syncs.items()))
            continue
        try:
            out[name] = cuda_graphed(fn, device)
        except RuntimeError as err:  # e.g. an op CUDA graphs do not allow
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            eager[name] = "capture failed: " + (str(err).splitlines() or ["?"])[0][:200]
    return out, eager


@dataclass
class SpeedRow:
    variant: str
    batch: int
    dtype: str
    img_per_s: float
    latency_ms: float
    gmacs: float
    speedup: float = 1.0  # median over rounds of (baseline time / this time in the same round)
    flops_ratio: float = 1.0  # dense GMACs / variant GMACs
    speedup_per_flops: float = 1.0  # speedup / flops_ratio: 1.0 = the FLOP saving fully turns into speed
    keep: float | None = None
    samples_s: list[float] | None = None
    spread: float = 1.0  # slowest / fastest round
    unstable: bool = False  # the rounds do not pin the number down (see speed_rows): do not trust it
    speedup_low: float | None = None  # 95% interval of the median paired speed-up (None: fewer than 6 rounds)
    speedup_high: float | None = None
    eager_reason: str | None = None  # CUDA graphs asked but this variant ran eagerly: why (see graph_variants)

    @property
    def img_per_s_text(self) -> str:
        return f"{self.img_per_s:.1f}" + (" (unstable)" if self.unstable else "")

    @property
    def speedup_text(self) -> str:
        """``1.21x [1.09, 1.35]``: the paired speed-up and its 95% interval (just ``1.21x`` without one)."""
        if self.speedup_low is None or self.speedup_high is None or self.speedup_low == self.speedup_high:
            return f"{self.speedup:.2f}x"
        return f"{self.speedup:.2f}x [{self.speedup_low:.2f}, {self.speedup_high:.2f}]"


def speed_table(
    variants: dict[str, tuple[nn.Module, float | None]],
    gmacs: dict[str, float],
    make_input: Callable[[int], torch.Tensor],
    batch_sizes: list[int],
    device: torch.device,
    dtype: torch.dtype,
    rounds: int,
    baseline: str,
    progress: bool = True,
    compile: bool = False,
    cuda_graphs: bool = False,
    onednn: str = "off",
) -> list[SpeedRow]:
    """Time every variant at every batch size on ``make_input(batch)``; speed-ups relative to ``baseline``.

    ``compile``: every variant (baseline included) runs through ``torch.compile(dynamic=False)``, compiled once
    per batch size before timing (static shapes: dense and budget mode; adaptive mode recompiles per shape).
    ``cuda_graphs`` (CUDA only): every variant that can be is captured once per batch size and replayed
    (:func:`graph_variants`); a row that ran eagerly says why (``eager_reason``).
    ``onednn``: ``"on"`` runs every variant's linears through oneDNN (:func:`tpcvit.onednn_linears`, in place),
    ``"both"`` times each variant as given and a converted copy of it (``<name>+onednn``) in the same rounds.
    """
    if cuda_graphs and device.type != "cuda":
        raise ConfigError(f"CUDA graphs need a CUDA device, got --device {device}: drop --cuda-graphs or use a GPU")
    variants, gmacs = onednn_variants(variants, gmacs, onednn, device, dtype, compile)
    rows: list[SpeedRow] = []
    dtype_name = str(dtype).removeprefix("torch.")
    for batch in batch_sizes:
        x = make_input(batch).to(device, dtype)
        models = {name: model for name, (model, _) in variants.items()}
        if compile:
            torch._dynamo.reset()  # a fresh compile per batch size: no guard failures, no recompilation limit
            models = {name: torch.compile(m, dynamic=False) for name, m in models.items()}
            with torch.inference_mode():
                for m in tqdm(models.values(), desc=f"compiling (batch {batch})", disable=not progress, leave=False):
                    m(x)
        fns = {name: (lambda m=model, x=x: m(x)) for name, model in models.items()}
        eager: dict[str, str] = {}
        iters = max(1, 8 // batch) if device.type == "cpu" else 10
        with torch.inference_mode():
            if cuda_graphs:
                fns, eager = graph_variants(fns, device)
                for name, why in eager.items():
                    warnings.warn(f"{name} at batch {batch} runs eagerly, not in a CUDA graph ({why})", stacklevel=2)
            samples = time_interleaved(fns, device, rounds=rounds, iters=iters, progress=progress)
        batch_rows = speed_rows(samples, gmacs, batch, dtype_name, baseline, {n: k for n, (_, k) in variants.items()})
        for row in batch_rows:
            row.eager_reason = eager.get(row.variant)
        rows += batch_rows
    return rows


ONEDNN_CHOICES = ("off", "on", "both")


def onednn_variants(variants: dict[str, tuple[nn.Module, float | None]], gmacs: dict[str, float], onednn: str,
                    device: torch.device, dtype: torch.dtype, compile: bool = False
                    ) -> tuple[dict[str, tuple[nn.Module, float | None]], dict[str, float]]:
    """The variants to time for ``onednn`` (see :func:`speed_table`); a one-line error where oneDNN linears would
    not run (not the CPU, not float32, compiled, not in this torch build)."""
    import copy

    from .layers import onednn_available, onednn_linears

    if onednn not in ONEDNN_CHOICES:
        raise ConfigError(f"--onednn takes one of {', '.join(ONEDNN_CHOICES)}, got {onednn!r}")
    if onednn == "off":
        return variants, gmacs
    if device.type != "cpu" or dtype != torch.float32:
        raise ConfigError(f"--onednn packs float32 CPU linears, got {device} {str(dtype).removeprefix('torch.')}: "
                          "drop --onednn (bfloat16 CPU linears already run oneDNN)")
    if compile:
        raise ConfigError("--onednn times eager oneDNN linears; a compiled graph runs its own: drop --onednn or "
                          "--compile")
    if not onednn_available():
        raise ConfigError("this torch build has no oneDNN (mkldnn) linear on this CPU: drop --onednn")
    if onednn == "on":
        return {name: (onednn_linears(m), keep) for name, (m, keep) in variants.items()}, gmacs
    out, counts = dict(variants), dict(gmacs)
    for name, (m, keep) in variants.items():
        out[f"{name}+onednn"] = (onednn_linears(copy.deepcopy(m)), keep)
        counts[f"{name}+onednn"] = gmacs[name]
    return out, counts


UNSTABLE_SPREAD = 1.5  # too few rounds for an interval: slowest / fastest round above this is flagged
UNSTABLE_INTERVAL = 1.25  # the 95% interval of a row's median (speed-up, or time for the baseline) spans more


def paired_speedup(base: list[float], times: list[float]) -> tuple[float, float | None, float | None]:
    """Speed-up of ``times`` over ``base`` (seconds per call, one sample per interleaved round): the median of the
    per-round ratios ``base[r] / times[r]`` and its 95% interval (:func:`tpcvit.stats.median_interval`).

    Why paired: on a shared VM the whole machine drifts (steal time) by more than the effects measured; both
    variants of one round ran seconds apart under the same drift, so their ratio cancels it."""
    from .stats import median_interval

    if len(base) != len(times):
        raise ValueError(f"paired rounds need equal counts, got {len(base)} and {len(times)}")
    return median_interval([b / t for b, t in zip(base, times)])


def speed_rows(samples: dict[str, list[float]], gmacs: dict[str, float], batch: int, dtype: str, baseline: str,
               keeps: dict[str, float | None] | None = None) -> list[SpeedRow]:
    """One :class:`SpeedRow` per variant from its timing samples (seconds per call) at one batch size.

    Speed-ups are paired per round (:func:`paired_speedup`). A row is flagged unstable when the 95% interval of its
    median (paired speed-up; the baseline's own time) spans more than :data:`UNSTABLE_INTERVAL`, or, with too few
    rounds for an interval, when its slowest round is :data:`UNSTABLE_SPREAD` times its fastest."""
    from .stats import median_interval

    base = samples[baseline]
    rows = []
    for name, times in samples.items():
        med = statistics.median(times)
        flops_ratio = gmacs[baseline] / gmacs[name]
        spread = max(times) / min(times) if min(times) > 0 else float("inf")
        speedup, low, high = paired_speedup(base, times)
        _, t_low, t_high = median_interval(times)
        width = (high / low) if name != baseline and low is not None else (t_high / t_low if t_low else None)
        unstable = width > UNSTABLE_INTERVAL if width is not None else spread > UNSTABLE_SPREAD
        rows.append(SpeedRow(name, batch, dtype, batch / med, med * 1e3, gmacs[name], speedup, flops_ratio,
                             speedup / flops_ratio, (keeps or {}).get(name), [round(t, 5) for t in times],
                             round(spread, 3), unstable, low, high))
    bad = [r.variant for r in rows if r.unstable]
    if bad:
        warnings.warn(f"unstable timings at batch {batch} for {bad}: the rounds do not pin the median down (95% "
                      f"interval wider than {UNSTABLE_INTERVAL}x, or rounds {UNSTABLE_SPREAD}x apart); the rows are "
                      "flagged: re-run with more rounds, on an idle machine", stacklevel=2)
    return rows


def speedup_header(rows: list[SpeedRow], label: str = "speed-up") -> str:
    """The speed-up column's name: with ``[95% CI]`` when the rows carry intervals (6 rounds or more)."""
    return label + (" [95% CI]" if any(r.speedup_low is not None for r in rows) else "")


def rows_to_markdown(rows: list[SpeedRow]) -> str:
    header = ["variant", "keep", "batch", "dtype", "img/s", "latency ms", "GMACs", speedup_header(rows), "FLOPs ratio",
              "speed-up/FLOPs", "round spread"]
    from .reporting import markdown_table

    return markdown_table(header, [
        [r.variant + (" (eager)" if r.eager_reason else ""), "-" if r.keep is None else f"{r.keep:.0%}", r.batch,
         r.dtype, r.img_per_s_text, f"{r.latency_ms:.1f}", f"{r.gmacs:.2f}", r.speedup_text, f"{r.flops_ratio:.2f}x",
         f"{r.speedup_per_flops:.2f}", f"{r.spread:.2f}x"] for r in rows])


def same_executor_markdown(rows: list[SpeedRow]) -> str:
    """Each variant's speed-up over ``dense-lean`` (the dense model on the same block executor) on its own GEMMs
    (with ``--onednn both``, the ``+onednn`` rows over ``dense-lean+onednn``), paired per round: the token saving's
    own share, which the speed-up over timm's forward mixes with the leaner execution and the faster linears. Empty
    without a ``dense-lean`` row."""
    from .reporting import markdown_table

    if not any(r.variant.startswith("dense-lean") for r in rows):
        return ""
    base = {(r.variant, r.batch): r for r in rows}
    table = []
    for r in rows:
        ref = base.get(("dense-lean+onednn" if r.variant.endswith("+onednn") else "dense-lean", r.batch))
        if ref is None or r.variant.startswith("dense"):
            continue
        ratio, low, high = paired_speedup(ref.samples_s, r.samples_s)
        interval = "" if low is None else f" [{low:.2f}, {high:.2f}]"
        table.append([r.variant, r.batch, ref.variant, f"{ratio:.2f}x{interval}", f"{ratio / r.flops_ratio:.2f}"])
    return ("Over the dense model on the same linears (paired per round, 95% interval; speed-up / FLOPs against "
            "the FLOPs ratio above):\n\n" + markdown_table(["variant", "batch", "over", "speed-up", "speed-up/FLOPs"],
                                                             table))


def speed_markdown(rows: list[SpeedRow]) -> str:
    """The speed table and, with a dense-lean row, the same-executor table under it (:func:`same_executor_markdown`):
    what ``tpcvit bench`` prints and writes."""
    versus = same_executor_markdown(rows)
    return rows_to_markdown(rows) + (f"\n\n{versus}" if versus else "")


def write_results(path: str | os.PathLike, rows: list[SpeedRow], meta: dict) -> Path:
    """Write ``<path>.json`` and ``<path>.md`` (atomically)."""
    from .checkpoint import atomic_write

    path = Path(path)
    payload = {"meta": meta, "rows": [asdict(r) for r in rows]}
    atomic_write(path.with_suffix(".json"), lambda t: Path(t).write_text(json.dumps(payload, indent=2)))
    md = f"Machine: {meta['machine']}\n\nCommand: `{meta['command']}`\n\n{speed_markdown(rows)}\n"
    atomic_write(path.with_suffix(".md"), lambda t: Path(t).write_text(md))
    return path.with_suffix(".json")


def bench_tpc_speed(
    model_name: str = "tpc_deit_small_patch16_224",
    keeps: tuple[float, ...] = (1.0, 0.7, 0.5, 0.3),
    batch_sizes: tuple[int, ...] = (1, 32),
    rounds: int = 7,
    device: str = "cpu",
    dtype: str = "float32",
    compile: bool = False,
    decide_every: tuple[int, ...] = (1,),
    cuda_graphs: bool = False,
    progress: bool = True,
    onednn: str = "off",
    **model_kwargs,
) -> tuple[list[SpeedRow], dict]:
    """Dense timm backbone (and, for a timm ViT, the same model on the lean block executor every reducer uses:
    ``dense-lean``) vs the TPC model in ``budget`` mode at each keep ratio (random weights: speed only). A plain
    timm ViT name times training-free TPC on it (``tpcvit.patch``: ``tpc-free@50%``); ``tpc_<any timm ViT>`` the
    learned controller (``with_tpc``);
    ``compile``: all of them through ``torch.compile``; ``cuda_graphs``: replayed from CUDA graphs; ``onednn``:
    linears through oneDNN (``on``), or each variant with and without (``both``, :func:`speed_table`);
    ``decide_every``: one TPC variant per value below keep 100% (``tpc@30%/5``: the controller decides in every 5th
    controlled block, :class:`ExecutionPolicy`)."""
    import timm

    from .flops import count_gmacs
    from .layers import lean_dense
    from .models import dense_name, image_geometry, reducer_method
    from .patch import patch, with_tpc
    from .policy import every_suffix
    from .runtime import current_policy, set_policy

    method = reducer_method(model_name)
    if method not in (None, "tpc"):
        raise ConfigError(f"--model {model_name} is a {method} model: bench times TPC on a backbone; time peers with "
                          f"--methods dense,tpc-free@0.5,{method}@0.5 --model {dense_name(model_name)}")
    dev, dt = torch.device(device), getattr(torch, dtype)
    try:
        dense = timm.create_model(dense_name(model_name), **model_kwargs).eval()
    except RuntimeError as err:
        raise ConfigError(f"unknown model {model_name!r}: a timm ViT name, or tpc_ before one") from err

    def fresh(tpc: bool) -> nn.Module:  # the dense model's weights, or a TPC model (tpc_*, or with_tpc on any ViT)
        if tpc and timm.is_model(model_name):
            return timm.create_model(model_name, **model_kwargs).eval()
        m = timm.create_model(dense_name(model_name), **model_kwargs).eval()
        m.load_state_dict(dense.state_dict())
        return with_tpc(m) if tpc else m

    def tpc_model(keep: float, every: int) -> nn.Module:  # TPC at this budget, every variant with the same weights
        try:
            if method is None:  # training-free: tpcvit.patch's controller and schedule
                return patch(fresh(False), keep=keep, decide_every=every)
            m = fresh(True)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"TPC on {dense_name(model_name)}: {str(err).splitlines()[0]}") from err
        m.load_state_dict(reference.state_dict())
        return set_policy(m, current_policy(m).replace(mode="budget", keep=keep, decide_every=every))

    try:
        reference = fresh(True) if method else None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"TPC on {dense_name(model_name)}: {str(err).splitlines()[0]}") from err
    label = "tpc-free" if method is None else "tpc"
    size = image_geometry(dense)
    variants: dict[str, tuple[nn.Module, float | None]] = {"dense": (dense, None)}
    lean = lean_dense(dense)  # the dense model on the reducers' lean executor: the token saving's speed-up alone
    if lean is not None:
        variants["dense-lean"] = (lean, None)
    for keep in keeps:
        for every in decide_every if keep < 1.0 else (1,):
            variants[f"{label}@{keep:.0%}{every_suffix(every)}"] = (tpc_model(keep, every), keep)
    probe = torch.randn(2, *size)
    gmacs = {name: count_gmacs(m, probe) for name, (m, _) in variants.items()}
    for m, _ in variants.values():
        m.to(dev, dt)
    rows = speed_table(variants, gmacs, lambda b: torch.randn(b, *size), list(batch_sizes), dev, dt, rounds,
                       baseline="dense", progress=progress, compile=compile, cuda_graphs=cuda_graphs,
                       onednn=onednn)
    meta = {"model": model_name, "dense": dense_name(model_name), "machine": machine_info(dev), "rounds": rounds,
            "mode": "budget", "compiled": compile, "cuda_graphs": cuda_graphs, "onednn": onednn,
            "decide_every": list(decide_every),
            "note": "random weights (speed only); medians over interleaved rounds"}
    return rows, meta
