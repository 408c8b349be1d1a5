"""oneDNN linears (tpcvit.onednn_linears): packed float32 CPU inference equals F.linear to float32 rounding on every
family and token reducer, every block executor runs the packed GEMMs, packs follow weight changes, and training,
autocast and other dtypes keep F.linear exactly."""

import copy
import pickle

import pytest
import timm  # noqa: I001
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SMALL, small_tpc
from test_families import SWIN_SMALL
from test_models import CountCalls
from test_peers import _rotary

import tpcvit
from tpcvit.layers import OneDNNLinear, PackedLinear, block_forward, lean_dense, onednn_available, plain_block

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear")

TINY_VIT = dict(SMALL, img_size=32, patch_size=4)


def _ops(fn) -> list[str]:
    """The ATen operators ``fn()`` dispatches, by name (test_models' counter)."""
    with torch.no_grad(), CountCalls() as mode:
        fn()
    return mode.calls


def _deit() -> nn.Module:
    """A tiny DeiT whose linears carry O(1) signals (timm's 0.02 init leaves logits ~1e-2: a stale weight would hide
    inside the tolerance)."""
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", **TINY_VIT).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                nn.init.normal_(m.bias, std=0.1)
    return model


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float32 rounding of a product summed in another order (and not trivially: both finite)."""
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_packed_linear_is_f_linear_and_fuses_exact_gelu():
    torch.manual_seed(0)
    linear, x = nn.Linear(48, 80), torch.randn(37, 48)
    with torch.no_grad():
        packed = PackedLinear(linear.weight, linear.bias)
        _close(packed(x), F.linear(x, linear.weight, linear.bias))
        _close(packed(x, gelu=True), F.gelu(F.linear(x, linear.weight, linear.bias)))  # erf GELU, not tanh
        assert not torch.allclose(packed(x, gelu=True), F.gelu(F.linear(x, linear.weight, linear.bias),
                                                               approximate="tanh"), rtol=0, atol=1e-6)
        _close(PackedLinear(linear.weight, None)(x), F.linear(x, linear.weight))


def test_conversion_keeps_parameters_and_training_is_f_linear_exactly():
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", **TINY_VIT)
    reference = copy.deepcopy(model)  # the same weights, nn.Linear everywhere
    before = dict(model.named_parameters())
    tpcvit.onednn_linears(model)
    assert dict(model.named_parameters()) == before  # the same Parameter objects, the same names
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert isinstance(model.blocks[0].attn.qkv, OneDNNLinear)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    reference.train()
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    assert torch.equal(out, reference(x))  # autograd on: F.linear, bitwise
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None and model.head.weight.grad is not None


@torch.no_grad()
def test_converted_blocks_run_packed_gemms_only_and_match_timm():
    dense = _deit()
    converted = tpcvit.onednn_linears(copy.deepcopy(dense))
    x = torch.randn(3, 3, 32, 32)
    _close(converted(x), dense(x))
    _close(lean_dense(converted)(x), dense(x))
    tokens = torch.randn(2, 65, 64)
    assert type(plain_block(converted.blocks[0]).fc1) is PackedLinear
    ops = _ops(lambda: block_forward(converted.blocks[0], tokens))
    assert ops.count("_linear_pointwise") == 4 and "addmm" not in ops and "gelu" not in ops
    ops = _ops(lambda: lean_dense(converted)(x))
    assert "addmm" not in ops and "linear" not in ops  # every linear of the model, head included


def test_timms_own_forward_runs_fc1_with_its_gelu_and_trains_as_before():
    """Converted, timm's ``Mlp`` (exact GELU) runs fc1 and the GELU as one oneDNN call in the model's own forward; a
    tanh-GELU ``Mlp`` is left alone; with autograd it is ``Mlp.forward``, bitwise; the lean executor still takes
    the block."""
    from timm.layers import Mlp

    from tpcvit.layers import OneDNNMlp

    dense = _deit()
    converted = tpcvit.onednn_linears(copy.deepcopy(dense))
    assert all(type(blk.mlp) is OneDNNMlp for blk in converted.blocks)
    assert list(converted.state_dict()) == list(dense.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        _close(converted(x), dense(x))
        ops = _ops(lambda: converted(x))
        assert "gelu" not in ops and ops.count("_linear_pointwise") == 4 * len(converted.blocks) + 1  # + the head
        assert "gelu" in _ops(lambda: dense(x))
        assert plain_block(converted.blocks[0]) is not None  # the lean executor still runs it
    tanh = tpcvit.onednn_linears(nn.Sequential(Mlp(8, 16, act_layer=lambda: nn.GELU(approximate="tanh"))))
    assert type(tanh[0]) is Mlp and isinstance(tanh[0].fc1, OneDNNLinear)
    own = Mlp(8, 16)
    own.fc1 = type("LoRALinear", (nn.Linear,), {})(8, 16)  # a Linear subclass keeps its own forward: no fusion
    assert type(tpcvit.onednn_linears(own)) is Mlp
    later = tpcvit.onednn_linears(Mlp(8, 16)).eval()
    later.fc1 = nn.Linear(8, 16)  # replaced after the conversion: the plain Mlp forward
    with torch.no_grad():
        assert torch.equal(later(torch.ones(2, 8)), Mlp.forward(later, torch.ones(2, 8)))
    converted.train()
    dense.train()
    assert torch.equal(converted(x), dense(x))  # autograd on: Mlp.forward on F.linear, bitwise
    converted(x).sum().backward()
    assert converted.blocks[0].mlp.fc1.weight.grad is not None


def test_converted_models_count_the_gmacs_of_their_linears():
    """GMACs counted on a converted model (dense, its lean executor, TPC in budget mode) are the unconverted model's:
    the counter knows oneDNN's packed linear, so ``tpcvit.patch(model, gmacs=...)`` after the conversion matches the
    same budget."""
    from tpcvit.flops import count_gmacs

    dense = _deit()
    converted = tpcvit.onednn_linears(copy.deepcopy(dense))
    x = torch.randn(2, 3, 32, 32)
    for a, b in ((dense, converted), (lean_dense(dense), lean_dense(converted))):
        assert count_gmacs(b, x) == pytest.approx(count_gmacs(a, x), rel=1e-9)
    tpc = tpcvit.set_policy(small_tpc().eval(), tpcvit.ExecutionPolicy(mode="budget", keep=0.5))
    reference = count_gmacs(tpc, x)
    assert count_gmacs(tpcvit.onednn_linears(tpc), x) == pytest.approx(reference, rel=1e-9)
    assert "_linear_pointwise" in _ops(lambda: tpc(x))  # counted on the packed path itself


@torch.no_grad()
def test_query_and_key_value_packs_are_made_only_for_the_paused_key_path():
    """A converted block keeps its qkv's query and key/value rows as packs of their own for TPC's paused keys; they
    are packed on first use, so a model that never runs that path holds one packed qkv, not three."""
    from tpcvit.layers import context_block

    converted = tpcvit.onednn_linears(_deit())
    blk, tokens = converted.blocks[0], torch.randn(2, 65, 64)
    block_forward(blk, tokens)
    p = plain_block(blk)
    assert p.qkv.weight is not None and p.q.weight is None and p.kv.weight is None
    out = context_block(blk, tokens[:, :20], tokens)
    assert p.q.weight is not None and p.kv.weight is not None
    _close(out, context_block(_deit().blocks[0], tokens[:, :20], tokens))


@torch.no_grad()
def test_packs_follow_in_place_updates_moves_and_autocast():
    dense = _deit()
    converted = tpcvit.onednn_linears(copy.deepcopy(dense))
    x = torch.randn(2, 3, 32, 32)
    lean = lean_dense(converted)  # made once: making a module registers one, which refreshes every cached block
    runs = lambda: lean(x)  # noqa: E731
    before = runs()
    for model in (dense, converted):  # in place, the way load_state_dict and an optimizer step write
        model.blocks[1].mlp.fc2.weight.mul_(3.0)
    after = runs()
    assert (after - before).abs().max() > 0.1  # the update shows in the output
    _close(after, dense(x))
    for model in (dense, converted):
        model.head.weight.add_(0.5)  # a linear called as a module
    _close(runs(), dense(x))
    converted.load_state_dict(dense.state_dict())
    _close(runs(), dense(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts F.linear: the packs step aside
        assert torch.equal(lean_dense(converted)(x), lean_dense(dense)(x))
        assert "_linear_pointwise" not in _ops(lambda: lean_dense(converted)(x))
    converted.double()
    dense.double()
    assert torch.equal(converted(x.double()), dense(x.double()))  # not float32: F.linear, bitwise
    converted.float()
    dense.float()
    _close(runs(), dense(x))


@torch.no_grad()
def test_converted_model_copies_pickles_and_loads():
    torch.manual_seed(0)
    model = tpcvit.onednn_linears(timm.create_model("deit_small_patch16_224", **TINY_VIT).eval())
    x = torch.randn(2, 3, 32, 32)
    out = model(x)  # packs made
    assert torch.equal(copy.deepcopy(model)(x), out)
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), out)
    plain = timm.create_model("deit_small_patch16_224", **TINY_VIT).eval()
    plain.load_state_dict(model.state_dict())  # the same keys as the nn.Linear model
    _close(plain(x), out)


MODELS = {  # every family and token reducer, small: (build, input side)
    "tpc patch (paused keys)": (lambda: tpcvit.patch(timm.create_model("deit_small_patch16_224", **TINY_VIT),
                                                     keep=0.5), 32),
    "tpc patch deciding once": (lambda: tpcvit.patch(timm.create_model("deit_small_patch16_224", **TINY_VIT),
                                                     keep=0.5, decide_every=4), 32),
    "tpc learned (budget)": (lambda: tpcvit.set_policy(small_tpc(), tpcvit.ExecutionPolicy(mode="budget", keep=0.5)),
                             32),
    "tpc learned (adaptive)": (lambda: small_tpc(), 32),
    "tpc swin": (lambda: timm.create_model("tpc_swin_tiny_patch4_window7_224", **SWIN_SMALL), 64),
    "tpc dinov3 (rotary)": (lambda: tpcvit.patch(_rotary("vit_small_patch16_dinov3", dynamic_img_size=False),
                                                 keep=0.5), 32),
    "evit": (lambda: timm.create_model("evit_deit_small_patch16_224", **TINY_VIT, keep_rate=0.5), 32),
    "tome": (lambda: timm.create_model("tome_deit_small_patch16_224", **TINY_VIT, tome_r=6), 32),
}


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_every_family_and_reducer_matches_with_oneDNN_linears(name):
    build, side = MODELS[name]
    model = build().eval()
    converted = tpcvit.onednn_linears(copy.deepcopy(model))
    torch.manual_seed(2)
    x = torch.randn(2, 3, side, side)
    _close(converted(x), model(x))
    assert "_linear_pointwise" in _ops(lambda: converted(x))


def test_missing_oneDNN_is_a_one_line_error(monkeypatch):
    import tpcvit.layers.onednn as onednn

    monkeypatch.setattr(onednn, "onednn_available", lambda: False)
    with pytest.raises(RuntimeError, match="no oneDNN"):
        tpcvit.onednn_linears(nn.Sequential(nn.Linear(2, 2)))


def test_bench_times_each_variant_with_and_without_and_refuses_what_would_not_pack():
    from tpcvit.bench import onednn_variants
    from tpcvit.config import ConfigError

    cpu = torch.device("cpu")
    variants, gmacs = onednn_variants({"dense": (nn.Sequential(nn.Linear(4, 4)), None)}, {"dense": 1.5}, "both", cpu,
                                      torch.float32)
    assert list(variants) == ["dense", "dense+onednn"] and gmacs == {"dense": 1.5, "dense+onednn": 1.5}
    assert type(variants["dense"][0][0]) is nn.Linear and type(variants["dense+onednn"][0][0]) is OneDNNLinear
    for kwargs in ({"dtype": torch.bfloat16}, {"compile": True}, {"device": torch.device("meta")}):
        args = {"device": cpu, "dtype": torch.float32, **kwargs}
        with pytest.raises(ConfigError, match="--onednn"):
            onednn_variants({"dense": (nn.Linear(2, 2), None)}, {"dense": 1.0}, "on", **args)
    from tpcvit.compare import run_compare

    with pytest.raises(ConfigError, match="--onednn on or off"):  # the copies would have no spec or GMACs point
        run_compare({}, ["dense"], {}, [1], 1, onednn="both")


def test_breakdown_runs_both_models_on_onednn_linears(monkeypatch):
    """``tpcvit bench --breakdown --onednn on``: TPC and the dense models run packed linears, each counted as one
    operator call like the ``aten::linear`` it replaces (the report's call counts stay comparable)."""
    from tpcvit.breakdown import breakdown, breakdown_markdown

    calls = []
    original = PackedLinear.__call__
    monkeypatch.setattr(PackedLinear, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=3)
    results = {on: breakdown("tpc_deit_tiny_patch16_224", [0.5], [1], rounds=1, onednn=on, **kw) for on in (0, 1)}
    assert calls and results[1]["onednn"] and "oneDNN linears" in breakdown_markdown(results[1])
    assert "oneDNN" not in breakdown_markdown(results[0])
    ops = [r["batches"]["1"]["aten_ops"] for r in results.values()]
    # each linear one call either way, and fc1 with its GELU one call on oneDNN: one call fewer per block, in timm's
    # forward and in the lean executor alike
    assert ops[1]["dense"] == ops[0]["dense"] - 3 and ops[1]["dense (lean)"] == ops[0]["dense (lean)"] - 3


@pytest.mark.slow
def test_converted_model_exports_to_onnx_and_traces_without_packed_ops(tmp_path):
    from tpcvit.export import export_onnx

    model = tpcvit.onednn_linears(small_tpc().eval())
    report = export_onnx(model, tmp_path / "m.onnx", mode="budget", keep=0.5)  # checked in onnxruntime
    assert report.max_abs_diff < 1e-4
    dense = tpcvit.onednn_linears(timm.create_model("deit_small_patch16_224", **TINY_VIT).eval())
    with torch.no_grad():
        graph = torch.jit.trace(dense, torch.randn(1, 3, 32, 32)).inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "aten::linear" in kinds and not any("mkldnn" in k for k in kinds)


def test_bench_pairs_every_variant_with_dense_lean_on_its_own_linears():
    """The same-executor table: each TPC row over dense-lean, a ``+onednn`` row over dense-lean+onednn (paired per
    round), dense rows left out; nothing without a dense-lean row."""
    from tpcvit.bench import SpeedRow, same_executor_markdown

    def row(variant: str, seconds: float, flops_ratio: float = 1.0) -> SpeedRow:
        return SpeedRow(variant, 1, "float32", 1 / seconds, 1e3 * seconds, 1.0, flops_ratio=flops_ratio,
                        samples_s=[seconds * f for f in (1.0, 1.1, 0.9, 1.05, 0.95, 1.0)])

    rows = [row("dense", 1.0), row("dense-lean", 0.8), row("tpc@50%", 0.5, 2.0), row("dense-lean+onednn", 0.4),
            row("tpc@50%+onednn", 0.32, 2.0)]
    table = same_executor_markdown(rows)
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| tpc")}
    assert set(lines) == {"tpc@50%", "tpc@50%+onednn"} and not any(line.startswith("| dense") for line in
                                                                     table.splitlines())
    assert "| dense-lean | 1.60x" in lines["tpc@50%"] and lines["tpc@50%"].endswith("| 0.80 |")
    assert "| dense-lean+onednn | 1.25x" in lines["tpc@50%+onednn"]
    assert same_executor_markdown([r for r in rows if not r.variant.startswith("dense-lean")]) == ""
