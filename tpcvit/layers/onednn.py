"""Linears through oneDNN with pre-packed weights: CPU float32 inference, opt-in (:func:`onednn_linears`).

Why: torch runs a float32 ``F.linear`` on x86 CPUs through MKL's sgemm. oneDNN (shipped inside torch as
``mkldnn``) multiplies with a weight packed once into its blocked layout: on a 2-core AMD EPYC with AVX-512 the
whole DeiT-S forward ran 2.0-2.2x faster at batch 1 and 1.8-2.1x at batch 32
(``benchmarks/results/onednn_speed_deit_small_cpu.md``). The result is the same product summed in another order
(float32 rounding, ~1e-6 relative), not bitwise timm's, so it is a choice the user makes, not a default.

Every token reducer's block executor (:func:`tpcvit.layers.block_forward` and its relatives) reads a converted
block's linears packed too, so dense, TPC and the peers run on the same GEMMs. Training, autograd, ``torch.compile``
tracing, other dtypes and other devices take ``F.linear`` unchanged.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

PackKey = tuple[int, int, int, int]


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build can run a packed oneDNN linear on this CPU (tried once on a tiny product)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2))
            torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), packed, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def autocast_cpu() -> bool:
    """Whether CPU autocast is on (it casts a linear to bfloat16: the packed float32 product would ignore it)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def traced() -> bool:
    """Being traced or exported (torch.compile and torch.export, which the ONNX exporter runs; TorchScript tracing,
    which its legacy path runs): the graph takes ``F.linear``, which every exporter knows, not the packed op. ~0.2
    us: it runs for every block at inference (``torch.onnx.is_in_onnx_export`` alone would cost 1 us)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def packable(weight: torch.Tensor) -> bool:
    """A weight oneDNN linears pack: float32 on the CPU, with oneDNN present."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and onednn_available()


class PackedLinear:
    """One linear's weight in oneDNN's layout plus its bias: ``packed(x)`` is ``F.linear(x, weight, bias)`` and
    ``packed(x, gelu=True)`` is ``F.gelu(F.linear(...))`` in one call (exact, erf GELU: the MLP's first layer
    without a separate pass over its 4x-wide output). Packed on its first call: a block keeps its qkv's query and
    key/value rows ready for the paused-key path, and only models that run it pay for those two extra copies."""

    __slots__ = ("source", "weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.source: torch.Tensor | None = weight.detach()
        self.weight: torch.Tensor | None = None
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if self.weight is None:
            self.weight, self.source = torch.ops.mkldnn._reorder_linear_weight(self.source), None
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


# module -> {row slice: (key, PackedLinear)}; outside the module so that deepcopy, pickling and state_dict never see
# a packed (opaque) tensor
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def version(t: torch.Tensor) -> int:
    """``t``'s in-place version (``copy_``, ``load_state_dict``, an optimizer step bump it); 0 for an inference
    tensor, which keeps none (made under ``torch.inference_mode``)."""
    return 0 if t.is_inference() else t._version


def _key(weight: torch.Tensor, bias: torch.Tensor | None) -> PackKey:
    """What a pack was made from: data pointers (``.to()`` moves the data) and in-place versions."""
    return (weight.data_ptr(), version(weight), 0 if bias is None else bias.data_ptr(),
            0 if bias is None else version(bias))


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose CPU float32 inference (no autograd, not traced) runs :class:`PackedLinear`, packed on
    first use and re-packed when the weight or bias changes; anything else is ``F.linear``. Same parameters, same
    state dict keys as the ``nn.Linear`` it replaces (:func:`onednn_linears`)."""

    def packed(self, x: torch.Tensor, rows: slice | None = None) -> PackedLinear | None:
        """The packed linear for ``x`` (``rows``: only those output rows, e.g. the query part of a qkv), or ``None``
        when ``x`` must take ``F.linear`` (autograd on, autocast, traced or exported, not CPU float32, no oneDNN)."""
        if (not packable(self.weight) or x.dtype != torch.float32 or x.device.type != "cpu"
                or torch.is_grad_enabled() or autocast_cpu() or traced()):
            return None
        return self.packed_rows(rows)

    def packed_rows(self, rows: slice | None = None) -> PackedLinear:
        """The (cached) pack of the weight's output ``rows`` (all by default), re-packed after the weight changed."""
        key = _key(self.weight, self.bias)  # the whole weight: its rows change when it does (no slice per call)
        cache = _PACKS.setdefault(self, {})
        slot = (None,) if rows is None else (rows.start, rows.stop)
        hit = cache.get(slot)
        if hit is None or hit[0] != key:
            weight, bias = self.weight, self.bias
            if rows is not None:
                weight, bias = weight[rows], None if bias is None else bias[rows]
            hit = cache[slot] = (key, PackedLinear(weight, bias))
        return hit[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed(x)
        return F.linear(x, self.weight, self.bias) if packed is None else packed(x)


class OneDNNMlp(Mlp):
    """timm's ``Mlp`` (exact GELU) whose fc1 and GELU run as one oneDNN call at CPU float32 inference, so timm's own
    forward does not write and re-read the ``[N, 4D]`` hidden tensor for a separate GELU (DeiT-S batch 32: timm's
    forward 1.19x slower without it, ``benchmarks/results/onednn_speed_deit_small_cpu.md``); anything else is
    ``Mlp.forward``. :func:`onednn_linears` swaps the class of such an ``Mlp`` in place: same parts, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.fc1.packed(x) if type(self.fc1) is OneDNNLinear else None  # fc1 replaced since: plain Mlp
        if packed is None:
            return super().forward(x)
        return self.drop2(self.fc2(self.norm(self.drop1(packed(x, gelu=True)))))


def fusable_mlp(mlp: nn.Module) -> bool:
    """A timm ``Mlp`` (exactly that type) with an exact-GELU activation whose fc1 was converted (a plain
    ``nn.Linear`` before: not a 1x1 convolution, a subclass or a quantised layer)."""
    act = getattr(mlp, "act", None)
    return (type(mlp) is Mlp and type(act) is nn.GELU and act.approximate == "none"
            and type(mlp.fc1) is OneDNNLinear)


def linear_rows(linear: nn.Linear, x: torch.Tensor, rows: slice) -> torch.Tensor:
    """``linear`` restricted to its output ``rows`` (the query or key/value part of a fused qkv) on ``x``: packed
    when ``linear`` is a :class:`OneDNNLinear` at inference, else ``F.linear`` on the sliced weight."""
    packed = linear.packed(x, rows) if isinstance(linear, OneDNNLinear) else None
    if packed is not None:
        return packed(x)
    bias = linear.bias
    return F.linear(x, linear.weight[rows], None if bias is None else bias[rows])


def onednn_linears(model: nn.Module) -> nn.Module:
    """Run ``model``'s linears through oneDNN at CPU float32 inference (in place; returns ``model``).

    Every plain ``nn.Linear`` (exactly that type: subclasses and quantised layers keep their own forward) becomes a
    :class:`OneDNNLinear` holding the same parameter objects, so weights, state dict, optimizer and devices are
    untouched and training is unchanged; every exact-GELU timm ``Mlp`` becomes a :class:`OneDNNMlp` (fc1 and GELU in
    one call). Works on any model: dense timm, ``tpcvit.patch``-ed, the peers. Raises ``RuntimeError`` when this
    torch build or CPU has no oneDNN linear."""
    if not onednn_available():
        raise RuntimeError("this torch build has no oneDNN (mkldnn) linear on this CPU: run without oneDNN linears "
                           "(torch.backends.mkldnn.is_available() is False or the op failed)")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, _converted(child))
    for module in model.modules():
        if fusable_mlp(module):
            module.__class__ = OneDNNMlp
    return model


def _converted(linear: nn.Linear) -> OneDNNLinear:
    """A :class:`OneDNNLinear` sharing ``linear``'s parameters (and its training flag)."""
    out = OneDNNLinear.__new__(OneDNNLinear)
    nn.Module.__init__(out)
    out.in_features, out.out_features = linear.in_features, linear.out_features
    out.weight = linear.weight
    out.register_parameter("bias", linear.bias)
    out.train(linear.training)
    return out
