"""Where a TPC forward spends its time (``tpcvit bench --breakdown``).

Per controlled block of a TPC ViT, timed in isolation on the model's own modules and shapes: the controller head,
the decision (probabilities, smoothing, top-k), building the selection and gathering/scattering it, and the block
run on its selection, next to the same block on every token. At model level: the dense timm model (and the same
model on the lean block executor TPC uses), TPC at keep 100% (its overhead over the lean dense model, paired per
round, with and without its stabilizers) and TPC at each keep ratio; what the per-block parts do not explain is
the glue of the propagation loop (stabilizer, per-forward state, Python). The ceiling: the dense model cut once to
the kept number of tokens (no decisions, no gather/scatter), i.e. the speed-up this machine gives for those FLOPs at
all. All numbers are medians over interleaved rounds.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn as nn

from . import controller as C
from .bench import host_syncs, machine_info, time_interleaved
from .layers import block_forward, context_block, embed_tokens, image_geometry, lean_dense, unwrap
from .models import TPCViT
from .policy import ExecutionPolicy, every_suffix
from .propagation import Propagation
from .reporting import markdown_table
from .runtime import BlockStep
from .tokens import run_on_selection


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


@torch.inference_mode()
def block_parts(model: nn.Module, batch: int, keep: float, rounds: int = 7, iters: int | None = None,
                device: str | torch.device = "cpu") -> dict[str, float]:
    """Microseconds per controlled block of each part of TPC's fast path (budget mode at ``keep``)."""
    m = unwrap(model).eval()
    if not isinstance(m, TPCViT):
        raise TypeError(f"the breakdown times the ViT family's blocks; got {type(m).__name__}")
    device = torch.device(device)
    cfg, policy = m.tpc_cfg, ExecutionPolicy(mode="budget", keep=keep)
    torch.manual_seed(0)
    images = torch.randn(batch, *image_geometry(m), device=device)
    x, ropes = m._tpc_embed_positions(images)
    prefix, stage = m._tpc_tokens(x)[1], m._tpc_stages(images)[0]
    grid, blk = stage.grid, stage.blocks[cfg.start_layer]
    n = grid[0] * grid[1]
    rope = None if ropes is None else ropes[cfg.start_layer]  # RoPE families: the block's rotary table
    head = m.controller[0] if len(m.controller) else None
    logits = head(x, prefix) if head is not None else torch.zeros(batch, n, 2, device=device)
    prop = Propagation(cfg, policy, batch, n, grid, device, sample=False, record=False)
    k = policy.budget_k(n, 0, cfg.target_keep)
    decision = prop.step(0, logits, k)
    step = BlockStep(decision, True, policy, False, k, attention=False, grid=grid, rope=rope)

    def gather_scatter() -> torch.Tensor:
        sel = m._tpc_selection(blk, x, step)
        return run_on_selection(lambda tokens, mask: tokens, x, sel)

    def selected_block() -> torch.Tensor:
        return m._tpc_run_block(blk, x, step)[0]

    fns = {"controller head": (lambda: head(x, prefix)) if head is not None else None,
           "decision (probabilities, smoothing, top-k)": lambda: prop.step(0, logits, k),
           "selection + gather/scatter": gather_scatter,
           "block on its selection (incl. gather/scatter)": selected_block,
           "block on every token (dense)": (lambda: blk(x)) if rope is None else (lambda: blk(x, rope=rope))}
    fns = {k: f for k, f in fns.items() if f is not None}
    if cfg.reads_attention:  # the training-free signal: the class row of the previous block's attention
        score = torch.rand(batch, x.shape[1], device=device)
        fns["attention logits (training-free)"] = lambda: C.attention_logits(
            score[:, prefix:], cfg.attention_threshold, cfg.attention_sharpness)
    iters = iters or max(2, 32 // batch)  # ~the same work per sample at every batch size
    samples = time_interleaved(fns, device, rounds=rounds, iters=iters, progress=False)
    return {k: round(_median_us(v), 2) for k, v in samples.items()}


def count_ops(fn) -> int:
    """Top-level operator calls (ATen's, and oneDNN's packed linears) of one ``fn()`` (torch.profiler): at batch 1
    on a CPU every call costs a few microseconds whatever its size, so this count, not the FLOPs, sets the floor of
    a small model's latency."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    return sum(1 for e in prof.events() if e.name.startswith(_OPERATORS)
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith(_OPERATORS)))


_OPERATORS = ("aten::", "mkldnn::")  # a converted linear (tpcvit.onednn_linears) is one mkldnn:: call, not aten::


def cut_forward(dense: nn.Module, x: torch.Tensor, start: int, keep: float, paused_keys: bool = False) -> torch.Tensor:
    """The dense model with its sequence cut once, before block ``start``, to the prefix tokens and the first
    ``round(keep * N)`` patch tokens: the same work per block as TPC's budget mode at ``keep`` (with
    ``paused_keys``, the rest stay frozen as keys/values, as TPC's paused tokens do), with no decision, no gather
    and no scatter. No token reducer can run those blocks faster on this machine, so its speed-up is the ceiling
    against which TPC's is read."""
    x = embed_tokens(dense, x)
    prefix, n = dense.num_prefix_tokens, dense.patch_embed.num_patches
    kept = prefix + max(1, round(keep * n))
    frozen = None
    for i, blk in enumerate(dense.blocks):
        if i == start:
            x, frozen = x[:, :kept].contiguous(), x[:, kept:]
        if frozen is not None and paused_keys:
            x = context_block(blk, x, torch.cat([x, frozen], dim=1))
        else:
            x = block_forward(blk, x)  # the executor TPC's blocks run with (no module calls)
    return dense.forward_head(dense.norm(x))


@torch.inference_mode()
def model_times(tpc: nn.Module, dense: nn.Module, batch: int, keeps: list[float], rounds: int = 7,
                device: str | torch.device = "cpu", decide_every: tuple[int, ...] = (1,)) -> dict:
    """Milliseconds (``model_ms``), ATen calls (``aten_ops``) and host synchronisations (``host_syncs``) per
    forward: the dense model (timm's forward, and ``dense (lean)``: its blocks on the executor TPC uses,
    :class:`LeanDenseViT`), TPC in budget mode at each keep ratio (1.0 included; below it once per ``decide_every``
    value, ``tpc@30%/5``), and the zero-overhead ceiling at each keep below 1 (:func:`cut_forward`).

    ``keep_100``: TPC at keep 100% over the dense reference, paired per round (median and 95% interval of
    ``tpc / dense`` - 1), and, for a model with stabilizers, the same model without them (``tpc@100% without
    stabilizers``, a copy): what the controller and the runtime cost, apart from the stabilizers, a model component
    the dense model does not have (their MACs are counted in its GMACs)."""
    import copy

    from .bench import paired_speedup

    device = torch.device(device)
    m = unwrap(tpc).eval()
    torch.manual_seed(0)
    x = torch.randn(batch, *image_geometry(m), device=device)
    fns = {"dense": lambda: dense(x)}
    lean = lean_dense(dense)  # the dense model on the executor TPC's blocks run with
    if lean is not None:
        fns["dense (lean)"] = lambda: lean(x)
    start = m.tpc_cfg.start_layer
    for keep in sorted({1.0, *keeps}, reverse=True):
        for every in decide_every if keep < 1.0 else (1,):
            policy = ExecutionPolicy(mode="budget", keep=keep, decide_every=every)
            name = f"tpc@{keep:.0%}{every_suffix(every)}"
            fns[name] = lambda p=policy: m.forward_head(m._propagate(x, p, with_trace=False)[0])
        if keep == 1.0 and len(m.stabilizers):
            bare = copy.deepcopy(m)
            bare.stabilizers = nn.ModuleDict()
            fns[f"{name} {WITHOUT_STABILIZERS}"] = lambda p=policy, b=bare: b.forward_head(
                b._propagate(x, p, with_trace=False)[0])
        if keep < 1.0:
            fns[f"cut once@{keep:.0%}"] = lambda k=keep: cut_forward(dense, x, start, k, m.tpc_cfg.paused_keys)
    iters = max(1, 16 // batch) if device.type == "cpu" else 10
    samples = time_interleaved(fns, device, rounds=rounds, iters=iters, progress=False)
    ops = {k: count_ops(f) for k, f in fns.items()}
    syncs = {k: sum(host_syncs(f).values()) for k, f in fns.items()}
    adaptive = ExecutionPolicy(mode="adaptive")  # for the record: its one read of the token count per decision
    syncs["tpc adaptive (not timed)"] = sum(host_syncs(lambda: m._propagate(x, adaptive, with_trace=False)).values())
    reference = samples.get("dense (lean)", samples["dense"])
    keep_100 = {}
    for key, name in (("overhead", "tpc@100%"), ("without_stabilizers", f"tpc@100% {WITHOUT_STABILIZERS}")):
        if name in samples:
            ratio, low, high = paired_speedup(samples[name], reference)  # median of tpc / dense per round
            keep_100[key] = [round(v - 1, 4) if v is not None else None for v in (ratio, low, high)]
    return {"model_ms": {k: round(statistics.median(v) * 1e3, 4) for k, v in samples.items()}, "aten_ops": ops,
            "host_syncs": syncs, "keep_100": keep_100}


WITHOUT_STABILIZERS = "without stabilizers"


def breakdown(model_name: str, keeps: list[float], batch_sizes: list[int], rounds: int = 7, device: str = "cpu",
              tpc_options: dict | None = None, decide_every: tuple[int, ...] = (1,), onednn: bool = False,
              **model_kwargs) -> dict:
    """The per-block parts and whole-model times at every batch size (random weights: speed only).
    ``model_kwargs``: the backbone's (both models); ``tpc_options``: :class:`TPCConfig` fields (TPC only);
    ``onednn``: both models' linears through oneDNN (:func:`tpcvit.onednn_linears`): with the GEMMs ~2x faster,
    TPC's own parts weigh twice as much, and this shows by how much."""
    import timm

    from .bench import onednn_variants
    from .models import dense_name

    tpc = timm.create_model(model_name, **model_kwargs, **(tpc_options or {})).eval().to(device)
    dense = timm.create_model(dense_name(model_name), **model_kwargs).eval().to(device)
    if onednn:  # the same checks and one-line errors as tpcvit bench --onednn on
        models = onednn_variants({"tpc": (tpc, None), "dense": (dense, None)}, {}, "on", torch.device(device),
                                 torch.float32, False)[0]
        tpc, dense = models["tpc"][0], models["dense"][0]
    controlled = len(tpc.blocks) - tpc.tpc_cfg.start_layer
    result = {"model": model_name, "kwargs": model_kwargs, "tpc": tpc_options or {}, "keeps": keeps,
              "decide_every": list(decide_every), "controlled_blocks": controlled, "machine": machine_info(device),
              "onednn": onednn,
              "rounds": rounds, "batches": {}}
    for batch in batch_sizes:
        measured = model_times(tpc, dense, batch, keeps, rounds, device, decide_every)
        times = measured["model_ms"]
        parts = {f"{keep:g}": block_parts(tpc, batch, keep, rounds, device=device) for keep in keeps}
        ceiling = {f"{keep:g}{every_suffix(every)}":
                   round(times[f"cut once@{keep:.0%}"] / times[f"tpc@{keep:.0%}{every_suffix(every)}"], 4)
                   for keep in keeps if keep < 1.0 for every in decide_every}
        result["batches"][str(batch)] = {**measured, "block_us": parts, "ceiling_fraction": ceiling}
    return result


def _keep_100_text(r: dict) -> str:
    """The keep-100% overhead, paired per round, and its part apart from the stabilizers."""
    def fmt(v: list) -> str:
        return f"{v[0]:+.1%}" + (f" [{v[1]:+.1%}, {v[2]:+.1%}]" if v[1] is not None else "")

    text = f"{fmt(r['keep_100']['overhead'])} overhead, paired per round"
    if "without_stabilizers" in r["keep_100"]:
        text += (f"; {fmt(r['keep_100']['without_stabilizers'])} without its stabilizers, i.e. the controller and "
                 "the runtime, the rest being the stabilizers: a model component the dense model lacks, its MACs "
                 "counted")
    return text


def breakdown_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"{result['model']}: {result['controlled_blocks']} controlled blocks; {m['cpu']}, {m['threads']} "
             f"threads, {m['device']}, fp32{', oneDNN linears (both models)' if result.get('onednn') else ''}; "
             f"medians of {result['rounds']} interleaved rounds.", ""]
    for batch, r in result["batches"].items():
        keeps = list(r["block_us"])
        parts = list(next(iter(r["block_us"].values())))
        reference = ("dense (lean), the dense model on the same block executor" if "dense (lean)" in r["model_ms"]
                     else "dense")
        lines += [f"Batch {batch}: one controlled block, microseconds", "",
                  markdown_table(["part"] + [f"keep {float(k):.0%}" for k in keeps],
                                 [[p] + [f"{r['block_us'][k][p]:.1f}" for k in keeps] for p in parts]), "",
                  f"Batch {batch}: whole forward, milliseconds (TPC at keep 100% vs {reference}: "
                  f"{_keep_100_text(r)})", "",
                  markdown_table(["variant", "ms", "vs dense (timm)", "vs dense (lean)", "ATen calls per forward",
                                  "host syncs per forward"],
                                 [[k, f"{v:.3f}", f"{r['model_ms']['dense'] / v:.2f}x",
                                   f"{r['model_ms']['dense (lean)'] / v:.2f}x" if "dense (lean)" in r["model_ms"]
                                   else "-", r["aten_ops"][k], r.get("host_syncs", {}).get(k, "-")]
                                  for k, v in r["model_ms"].items()]), ""]
        adaptive = r.get("host_syncs", {}).get("tpc adaptive (not timed)")
        if adaptive is not None:
            budget = max(v for k, v in r["host_syncs"].items() if k.startswith("tpc@"))
            lines += [f"Host synchronisations per forward (on a GPU the CPU waits at each; none = the pass can be "
                      f"captured in a CUDA graph): TPC budget mode {budget}, adaptive mode {adaptive} (its token "
                      "count, read once per decision).", ""]
        if r.get("ceiling_fraction"):
            reached = ", ".join(f"keep {float(k.split('/')[0]):.0%}{'/' + k.split('/')[1] if '/' in k else ''}: "
                                f"{v:.0%}" for k, v in r["ceiling_fraction"].items())
            lines += ["TPC's speed as a fraction of the zero-overhead ceiling (the dense model cut once to the same "
                      "number of tokens per block, paused ones kept as keys where TPC keeps them; 100% = TPC costs "
                      f"nothing beyond those blocks): {reached}", ""]
    return "\n".join(lines)

