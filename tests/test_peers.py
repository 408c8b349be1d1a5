"""Peers in the one harness (ToMe, EViT, A-ViT, IdleViT, DynamicViT): build, run, train, honour their budget knob,
and agree with dense."""

import copy
import math

import pytest
import timm
import torch
from conftest import SMALL, small_tpc

from tpcvit import count_gmacs, set_mode
from tpcvit.baselines.avit import gaussian_prior, halting_step
from tpcvit.baselines.common import PEER_METHODS
from tpcvit.baselines.evit import keep_topk_fuse
from tpcvit.baselines.idlevit import token_cut_loss
from tpcvit.baselines.tome import bipartite_plan, merge_schedule, merge_weighted
from tpcvit.budget import match_gmacs
from tpcvit.compare import parse_spec
from tpcvit.config import ConfigError
from tpcvit.flops import measured_gmacs
from tpcvit.reporting import pareto_front

PEERS = sorted(n for m in PEER_METHODS for n in timm.list_models(f"{m}_*"))
BUDGET = {"tome": {"tome_r": 8.0}, "evit": {"keep_rate": 0.5}, "avit": {}, "idlevit": {"keep_rate": 0.4},
          "dynamicvit": {"keep_rate": 0.6}}
GRID = dict(SMALL, img_size=32, patch_size=4)  # 8x8 = 64 tokens: budgets have room to be matched finely


def _peer(name: str, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **{**GRID, **kwargs})
    if hasattr(model, "halting"):  # trained-like halting head: scores that differ per token
        torch.nn.init.normal_(model.halting.weight, std=0.5)
        torch.nn.init.constant_(model.halting.bias, -1.0)
    return model


def _dense_twin(model):
    dense = timm.create_model("deit_small_patch16_224", **GRID).eval()
    dense.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith(("halting.", "predictors."))})
    return dense


@pytest.fixture
def grid_images():
    torch.manual_seed(1)
    return torch.randn(6, 3, 32, 32)


def test_every_peer_family_registered_for_tiny_small_base():
    assert {n.split("_deit_")[0] for n in PEERS} == {"tome", "evit", "avit", "idlevit", "dynamicvit"}
    assert len(PEERS) == 15


@pytest.mark.parametrize("name", PEERS)
def test_every_peer_builds_runs_and_trains(name, grid_images):
    budget = BUDGET[name.split("_")[0]]
    model = _peer(name, **budget, depth=4, embed_dim=64 if "tiny" in name else 96, num_heads=2)
    model.train()
    logits, trace = model.forward_with_trace(grid_images)
    assert logits.shape == (6, 5) and torch.isfinite(logits).all()
    assert trace.keep.shape == (6, 4) and float(trace.keep[:, -1].mean()) < 1.0
    weights = {"alpha_dist": 1.0, "alpha_budget": 1.0}
    loss = logits.logsumexp(dim=1).mean() + model.reduction_loss(trace, weights)["total"]
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
               and not n.startswith(("head_dist", "dist_token"))]
    assert not no_grad, no_grad
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(grid_images)).all()


def test_peers_without_reduction_equal_the_dense_backbone(grid_images):
    for name, knob in (("tome_deit_small_patch16_224", 0.0), ("evit_deit_small_patch16_224", 1.0),
                       ("avit_deit_small_patch16_224", 4.0), ("idlevit_deit_small_patch16_224", 1.0),
                       ("dynamicvit_deit_small_patch16_224", 1.0)):
        model = _peer(name).eval()
        model.set_budget(knob)
        with torch.no_grad():
            torch.testing.assert_close(model(grid_images), _dense_twin(model)(grid_images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,target", [(m, t) for m in ("tome", "avit", "tpc", "idlevit", "dynamicvit")
                                         for t in (0.5, 0.35)]
                         + [("evit", 0.6), ("evit", 0.45)])  # EViT's floor: blocks before its first reduction
def test_budget_knob_matches_a_gmacs_target_within_5_percent(name, target, grid_images):
    name = f"{name}_deit_small_patch16_224"
    model = small_tpc(name, **{k: v for k, v in GRID.items() if k != "num_classes"}, num_classes=5) \
        if name.startswith("tpc_") else _peer(name)
    dense = count_gmacs(_dense_twin(model) if not name.startswith("tpc_") else set_mode(model, "dense"), grid_images)
    knob, got = match_gmacs(model.eval(), grid_images, target * dense)
    assert abs(got / dense - target) <= 0.05 * target, (knob, got / dense)
    assert measured_gmacs(model, grid_images) == pytest.approx(got)  # the knob stays set
    assert count_gmacs(model, grid_images) == pytest.approx(got, rel=0.01)  # the counted work agrees


def test_avit_fast_path_equals_masked_path_and_never_restarts(grid_images):
    model = _peer("avit_deit_small_patch16_224", halt_threshold=0.6).eval()
    with torch.no_grad():
        fast, t_fast = model.forward_with_trace(grid_images, path="fast")
        masked, t_masked = model.forward_with_trace(grid_images, path="masked")
        alone, _ = model.forward_with_trace(grid_images[:1], path="fast")
    assert torch.equal(t_fast.active, t_masked.active)
    assert 0.2 < t_fast.active.float().mean() < 0.95  # mixed decisions: the comparison means something
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, fast[:1], rtol=1e-4, atol=1e-5)
    a = t_fast.active.int()
    assert (a[:, 1:] <= a[:, :-1]).all()  # halted for good


def test_avit_reference_gate_reads_channel_zero(grid_images):
    model = _peer("avit_deit_small_patch16_224", halt_gate="channel", gate_center=0.0, gate_scale=10.0).eval()
    x = torch.zeros(1, 5, 96)
    x[0, 1:, 0] = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    h = model._halt_scores(x)
    torch.testing.assert_close(h, torch.sigmoid(10 * x[:, 1:, 0]))
    with torch.no_grad():
        _, trace = model.forward_with_trace(grid_images)
    assert trace.active.shape == (6, 4, 64)
    with pytest.raises(ValueError, match="halt_gate"):
        _peer("avit_deit_small_patch16_224", halt_gate="nope")


def test_peer_gmacs_in_the_trace_agree_with_the_flop_counter(grid_images):
    for name, kw in (("avit_deit_small_patch16_224", {"halt_threshold": 0.6}), ("tome_deit_small_patch16_224",
                     {"tome_r": 10.0}), ("evit_deit_small_patch16_224", {"keep_rate": 0.4})):
        model = _peer(name, **kw).eval()
        with torch.no_grad():
            _, trace = model.forward_with_trace(grid_images)
        assert model.gmacs_per_image(trace).mean().item() == pytest.approx(count_gmacs(model, grid_images), rel=0.01)


def test_measured_gmacs_of_adaptive_models_is_the_per_image_count(grid_images):
    """The fast (one traced batch) GMACs of adaptive models == counting each image alone, within 1%."""
    avit = _peer("avit_deit_small_patch16_224", halt_threshold=0.6).eval()
    tpc = set_mode(small_tpc(**{k: v for k, v in GRID.items() if k != "num_classes"}, num_classes=5), "adaptive")
    for model in (avit, tpc):
        fast = measured_gmacs(model, grid_images)
        counted = count_gmacs(model, grid_images)  # per image: adaptive
        dense = count_gmacs(_dense_twin(model) if model is avit else set_mode(copy.deepcopy(model), "dense"),
                            grid_images)
        assert fast < 0.97 * dense  # some tokens skipped: the comparison means something
        assert fast == pytest.approx(counted, rel=0.01)


def test_tome_merging_conserves_token_mass_and_removes_r_tokens():
    torch.manual_seed(0)
    x, size = torch.randn(2, 10, 4), torch.rand(2, 10, 1) + 0.5
    plan = bipartite_plan(torch.randn(2, 10, 8), r=3)
    merged, new_size = merge_weighted(x, size, plan)
    assert merged.shape == (2, 7, 4) and new_size.shape == (2, 7, 1)
    torch.testing.assert_close((merged * new_size).sum(1), (x * size).sum(1))
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    one = merge_weighted(x[:, :1], size[:, :1], bipartite_plan(torch.randn(2, 1, 8), r=3))  # nothing to merge into
    torch.testing.assert_close(one[0], x[:, :1])
    assert merge_schedule(2.5, 4) == [3, 3, 2, 2] and sum(merge_schedule(0.3, 10)) == 3


def test_tome_merges_the_most_similar_pair_first():
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [-1.0, 0.3]]])  # token 0 ~ token 1
    plan = bipartite_plan(metric, r=1)
    assert plan.src.tolist() == [[0]] and plan.dst.tolist() == [[0]]  # A[0] (token 0) into B[0] (token 1)


def test_evit_keeps_the_attentive_tokens_in_order_and_fuses_the_rest():
    x = torch.arange(5.0)[None, :, None].repeat(1, 1, 2)
    score = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    out = keep_topk_fuse(x, score, k=2)
    assert out[0, :2, 0].tolist() == [1.0, 3.0]
    assert out[0, 2, 0].item() == pytest.approx((0.1 * 0 + 0.05 * 2 + 0.05 * 4) / 0.2)


@pytest.mark.parametrize("name,knob", [("evit", {"keep_rate": 0.5}), ("tome", {"tome_r": 8.0})])
@torch.no_grad()
def test_mid_block_peers_infer_on_the_lean_executor_as_they_train(name, knob, grid_images):
    """EViT and ToMe change the tokens between attention and MLP: at inference they run those halves on the lean
    executor (fused attention, the class row alone, plain-block ops: timed like TPC's). Same logits as the path
    training uses (timm's modules), no dropout here; and they do reduce."""
    model = _peer(f"{name}_deit_small_patch16_224", **knob).eval()
    lean = model(grid_images)
    torch.testing.assert_close(lean, model.train()(grid_images), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(lean, _dense_twin(model.eval())(grid_images), atol=1e-3)


@torch.no_grad()
def test_attend_lean_path_is_timms_block():
    """``attend`` (IdleViT's block with the class row) at inference: the lean executor gives timm's block output
    and the class-row attention the explicit map gives, with and without a key bias."""
    from timm.models.vision_transformer import Block

    from tpcvit.layers import attend

    torch.manual_seed(0)
    blk = Block(32, 4, qkv_bias=True).eval()
    x = torch.randn(3, 9, 32)
    bias = torch.zeros(3, 1, 1, 9).masked_fill(torch.rand(3, 1, 1, 9) > 0.6, -1e4)
    for key_bias in (None, bias):
        out, cls_attn, none = attend(blk, x, key_bias)
        full, cls_full, weights = attend(blk, x, key_bias, need_weights=True)
        assert none is None and weights.shape == (3, 4, 9, 9)
        torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cls_attn, cls_full, atol=1e-6, rtol=1e-5)
    assert torch.equal(attend(blk, x)[0], blk(x))  # the plain-block ops are bitwise timm's block


def test_avit_halting_distribution_sums_to_one_per_token():
    torch.manual_seed(0)
    b, n, depth = 3, 7, 5
    cum, running = torch.zeros(b, n), torch.ones(b, n, dtype=torch.bool)
    masses = []
    for i in range(depth):
        cum, halts, mass = halting_step(cum, torch.rand(b, n) * 0.6, running, 0.99, i == depth - 1)
        masses.append(mass)
        running = running & ~halts
    assert not running.any()
    torch.testing.assert_close(torch.stack(masses).sum(0), torch.ones(b, n))
    assert gaussian_prior(6, 2.5, 1.0).sum().item() == pytest.approx(1.0)


def test_specs_parse_with_clear_errors():
    assert parse_spec("tome@0.5").target == 0.5 and parse_spec("evit=0.7").knob == 0.7
    assert parse_spec("tpc@0.35").label == "tpc@35%"
    strided = parse_spec("tpc-keys@0.45/2")
    assert (strided.method, strided.target, strided.every, strided.label) == ("tpc-keys", 0.45, 2, "tpc-keys@45%/2")
    assert parse_spec("tpc-adaptive/3").every == 3 and parse_spec("tpc@0.5/1").label == "tpc@50%"
    assert parse_spec("dense-lean").method == "dense-lean"
    for bad, msg in (("foo@0.5", "unknown method"), ("tome", "needs a budget"), ("dense@0.5", "no budget knob"),
                     ("dense-lean=1", "no budget knob"),
                     ("evit@1.5", "must be in"), ("evit@abc", "must be a number"), ("tome@0.5/2", "TPC spec only"),
                     ("tpc@0.5/0", "K >= 1"), ("tpc@0.5/x", "K >= 1")):
        with pytest.raises(ConfigError, match=msg):
            parse_spec(bad)


def test_pareto_front_drops_dominated_points():
    pts = [(1.0, 70.0), (2.0, 80.0), (2.5, 75.0), (3.0, 82.0)]
    assert pareto_front(pts, higher_x_better=False) == [(1.0, 70.0), (2.0, 80.0), (3.0, 82.0)]
    assert pareto_front(pts, higher_x_better=True) == [(3.0, 82.0)]


@pytest.mark.parametrize("name", ["idlevit_deit_small_patch16_224", "dynamicvit_deit_small_patch16_224"])
def test_idlevit_and_dynamicvit_fast_path_equals_masked_path(name, grid_images):
    model = _peer(name, **BUDGET[name.split("_")[0]]).eval()
    with torch.no_grad():
        fast, t_fast = model.forward_with_trace(grid_images, path="fast")
        masked, t_masked = model.forward_with_trace(grid_images, path="masked")
        alone, _ = model.forward_with_trace(grid_images[:1], path="fast")
    assert torch.equal(t_fast.active, t_masked.active)
    assert 0.2 < t_fast.active[:, -1].float().mean() < 0.8  # reduced: the comparison means something
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, fast[:1], rtol=1e-4, atol=1e-5)


def test_idlevit_selects_idle_tokens_again_and_dynamicvit_never_does(grid_images):
    with torch.no_grad():
        _, idle = _peer("idlevit_deit_small_patch16_224", keep_rate=0.4).eval().forward_with_trace(grid_images)
        _, dvit = _peer("dynamicvit_deit_small_patch16_224", keep_rate=0.6).eval().forward_with_trace(grid_images)
    a = idle.active
    assert (a[:, 1:] & ~a[:, :-1]).any()  # idle at block l, computed again at l + 1
    assert (a[:, 1:].sum(-1) == round(0.4 * 64)).all()  # the same k tokens per controlled block
    d = dvit.active.int()
    assert (d[:, 1:] <= d[:, :-1]).all()  # dropped for good
    assert d[:, -1].sum(-1).tolist() == [round(0.6 ** 3 * 64)] * 6


@pytest.mark.parametrize("name", ["idlevit_deit_small_patch16_224", "dynamicvit_deit_small_patch16_224"])
def test_idlevit_and_dynamicvit_gmacs_count_the_work_done_and_fall_with_the_knob(name, grid_images):
    from tpcvit.flops import vit_gmacs_from_counts

    model = _peer(name).eval()
    gmacs = []
    for knob in (1.0, 0.8, 0.6, 0.4, 0.2):
        model.set_budget(knob)
        with torch.no_grad():
            _, trace = model.forward_with_trace(grid_images)
        counted = count_gmacs(model, grid_images)
        extra = 0.0
        if name.startswith("dynamicvit") and knob < 1.0:  # the predictors, on the tokens alive before each stage
            d = model.embed_dim
            per_token = d * d + d * d // 2 + d // 2 * d // 4 + d // 4 * 2
            extra = sum(trace.active[0, i - 1].sum().item() * per_token for i in model.dvit_blocks)
        blocks_only = vit_gmacs_from_counts(model, trace.active.sum(dim=2), extra_macs=extra).mean().item()
        assert blocks_only <= counted <= blocks_only * 1.02  # + the class-attention row; nothing for idle tokens
        gmacs.append(counted)
    assert all(a > b for a, b in zip(gmacs, gmacs[1:])), gmacs
    assert gmacs[0] == pytest.approx(count_gmacs(_dense_twin(model), grid_images), rel=1e-6)


def test_token_cut_loss_is_zero_for_separated_sets_and_one_for_uniform_attention():
    n, p = 6, 1
    selected = torch.tensor([[True, True, True, False, False, False]])
    visible = torch.ones(1, n, dtype=torch.bool)
    uniform = torch.full((1, 2, n + p, n + p), 1.0 / (n + p))
    assert token_cut_loss(uniform, visible, selected, p).item() == pytest.approx(1.0)  # cut/|S| + cut/|I|
    blocks = torch.zeros(1, 2, n + p, n + p)
    blocks[:, :, 1:4, 1:4] = blocks[:, :, 4:, 4:] = 1.0 / 3
    assert token_cut_loss(blocks, visible, selected, p).item() == pytest.approx(0.0)
    # tokens that did not take part in the block are left out of both sets
    half = torch.tensor([[True, True, False, True, True, False]])
    assert token_cut_loss(uniform, half, selected, p).item() == pytest.approx(1.0)


@pytest.mark.parametrize("method", sorted(BUDGET))
def test_as_peer_on_a_model_the_user_has_is_the_registered_peer(method, grid_images):
    """``as_peer`` on a dense DeiT gives the registered peer's outputs (same weights, same method parts), keeps the
    model's state-dict keys, and works on timm ViTs no peer is registered for (register tokens, distilled)."""
    from tpcvit.baselines import as_peer

    registered = _peer(f"{method}_deit_small_patch16_224", **BUDGET[method]).eval()
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", **GRID).eval()
    dense_keys = set(dense.state_dict())
    converted = as_peer(dense, method, **BUDGET[method])
    assert set(converted.state_dict()) >= dense_keys
    converted.load_state_dict(registered.state_dict())  # the method's own parts initialise randomly: align them
    with torch.no_grad():
        assert torch.equal(converted(grid_images), registered(grid_images))
    for kw in ({"reg_tokens": 4}, {"distilled": True}):
        name = "deit_small_distilled_patch16_224" if kw.pop("distilled", False) else "vit_small_patch16_224"
        model = as_peer(timm.create_model(name, **{**GRID, **kw}), method, **BUDGET[method]).eval()
        with torch.no_grad():
            logits, trace = model.forward_with_trace(grid_images)
        assert logits.shape == (6, 5) and torch.isfinite(logits).all() and trace.keep.shape[0] == 6


def test_as_peer_errors_name_what_the_model_lacks():
    from tpcvit.baselines import as_peer

    no_class_token = timm.create_model("vit_small_patch16_224", **GRID, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token"):
        as_peer(no_class_token, "evit")
    assert as_peer(no_class_token, "tome", tome_r=4).budget == 4  # merging needs no class token
    with pytest.raises(ValueError, match="already is a token-reduction peer"):
        as_peer(no_class_token, "dynamicvit")
    with pytest.raises(ValueError, match="unknown peer method"):
        as_peer(timm.create_model("vit_small_patch16_224", **GRID), "merge")
    with pytest.raises(ValueError, match="dynamic_img_size=False"):  # peers size their budgets for one grid
        as_peer(timm.create_model("vit_small_patch16_224", **GRID, dynamic_img_size=True), "evit")
    with pytest.raises(NotImplementedError, match="tpcvit.patch"):  # timm's would silently run the dense model
        as_peer(timm.create_model("vit_small_patch16_224", **GRID), "evit").forward_intermediates(
            torch.randn(1, 3, 32, 32))
    rope = {"img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2}
    with pytest.raises(ValueError, match="rope_mixed"):  # one row per token, not one per block
        as_peer(timm.create_model("vit_small_patch16_rope_mixed_224", **rope), "tome")
    with pytest.raises(ValueError, match="dynamic_img_size=False"):
        as_peer(timm.create_model("vit_small_patch16_rope_224", dynamic_img_size=True, **rope), "evit")


def test_bench_builds_a_peer_on_any_timm_vit_by_name():
    """``tpcvit bench --model vit_... --methods tome@0.5``: the peer on a backbone it is not registered for."""
    from tpcvit.compare import build_variant
    from tpcvit.config import load_config

    cfg = load_config(None, ["model.name=vit_small_patch16_224",
                             "model.kwargs={img_size: 32, patch_size: 8, depth: 4, embed_dim: 64, num_heads: 2, "
                             "reg_tokens: 2}"])
    model = build_variant(cfg, parse_spec("tome=3"), 10, {})
    assert type(model).__name__ == "ToMeVisionTransformer" and model.num_prefix_tokens == 3
    model.set_budget(3)  # as the bench moves the knob
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ConfigError, match="unknown model"):
        build_variant(load_config(None, ["model.name=vit_nonexistent_patch16_224"]), parse_spec("tome=3"), 10, {})


ROTARY = {  # timm Eva models with one rotary table shared by every block (small, random weights)
    "DINOv3": ("vit_small_patch16_dinov3", {"dynamic_img_size": False}),
    "EVA-02": ("eva02_tiny_patch14_224", {}),
    "RoPE ViT": ("vit_small_patch16_rope_224", {}),
}
ROTARY = {k: v for k, v in ROTARY.items() if timm.is_model(v[0])}


def _rotary(name, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=2, num_classes=5,
                              init_values=1.0, **kw).eval()
    with torch.no_grad():  # sharp attention (timm's init: every key alike, so a wrong rotary row goes unnoticed)
        for blk in model.blocks:
            blk.attn.qkv.weight[:2 * blk.attn.proj.in_features] *= 4
        torch.nn.init.normal_(model.head.weight, std=model.embed_dim ** -0.5)
    return model


@pytest.mark.parametrize("variant", list(ROTARY))
@pytest.mark.parametrize("method,off,on", [("tome", {"tome_r": 0}, {"tome_r": 6}),
                                           ("evit", {"keep_rate": 1.0}, {"keep_rate": 0.5}),
                                           ("idlevit", {"keep_rate": 1.0}, {"keep_rate": 0.4}),
                                           ("dynamicvit", {"keep_rate": 1.0}, {"keep_rate": 0.6})])
def test_peers_run_on_rotary_models(variant, method, off, on, grid_images):
    """``as_peer`` on a timm Eva: with no reduction the original model's logits; with it, fewer GMACs and other
    logits (every patch token carries its rotary row through merges and fusions)."""
    from tpcvit.baselines import as_peer

    name, kw = ROTARY[variant]
    original = _rotary(name, **kw)
    with torch.no_grad():
        reference = original(grid_images)
        peer = as_peer(_rotary(name, **kw), method, **off)
        torch.testing.assert_close(peer(grid_images), reference, rtol=1e-5, atol=1e-5)
        dense_gmacs = count_gmacs(peer, grid_images)
        reduced = as_peer(_rotary(name, **kw), method, **on)
        logits, trace = reduced.forward_with_trace(grid_images)
    assert torch.isfinite(logits).all() and not torch.allclose(logits, reference, atol=1e-3)
    assert trace.keep[:, -1].max() < 1.0 and count_gmacs(reduced, grid_images) < 0.85 * dense_gmacs


def test_evit_on_a_rotary_model_keeps_each_kept_tokens_own_rotary_row(grid_images):
    """EViT without the fused token, reorganising once (block 1): the blocks after it are timm's own EvaBlocks on
    the kept tokens with those tokens' rows of the table, gathered here independently."""
    from tpcvit.baselines import as_peer
    from tpcvit.layers import class_row_attention, eva_attention_half, eva_mlp_half

    name, kw = ROTARY["DINOv3"] if "DINOv3" in ROTARY else ROTARY["RoPE ViT"]
    peer = as_peer(_rotary(name, **kw), "evit", keep_rate=0.5, fuse_token=False, evit_blocks=[1])
    with torch.no_grad():
        got = peer.forward_features(grid_images)
        x, rope = peer._pos_embed(peer.patch_embed(grid_images))
        x, p = peer.norm_pre(x), peer.num_prefix_tokens
        x = peer.blocks[0](x, rope=rope)
        x, q, k = eva_attention_half(peer.blocks[1], x, rope, p)
        order = class_row_attention(q, k)[:, p:].argsort(dim=1, descending=True)
        top = order[:, :math.ceil(0.5 * (x.shape[1] - p))].sort(dim=1).values
        x = torch.cat([x[:, :p], x[:, p:].gather(1, top[..., None].expand(-1, -1, x.shape[-1]))], dim=1)
        x = eva_mlp_half(peer.blocks[1], x)

        def rest(rows):
            y = x
            for blk in peer.blocks[2:]:
                y = blk(y, rope=rows)
            return peer.norm(y)

        torch.testing.assert_close(got, rest(rope[top][:, None]), rtol=1e-5, atol=1e-5)  # the kept tokens' own rows
        assert not torch.allclose(got, rest(rope[top.flip(1)][:, None]), atol=1e-4)  # the same rows, wrong tokens


@pytest.mark.parametrize("variant", list(ROTARY))
def test_idlevit_on_a_rotary_model_runs_each_selected_token_with_its_own_rotary_row(variant, grid_images):
    """IdleViT on an Eva: the fast path (the selected tokens gathered with their rotary rows) equals the masked path
    (every token with the whole table, idle keys masked); a block on the selection is timm's own EvaBlock on those
    tokens and rows; and training (the token cut loss on the whole rotated attention map) back-propagates."""
    from tpcvit.baselines import as_peer
    from tpcvit.layers import eva_attend
    from tpcvit.tokens import select_topk

    name, kw = ROTARY[variant]
    peer = as_peer(_rotary(name, **kw), "idlevit", keep_rate=0.4)
    p, n = peer.num_prefix_tokens, peer.patch_embed.num_patches
    with torch.no_grad():
        fast, t_fast = peer.forward_with_trace(grid_images, path="fast")
        masked, t_masked = peer.forward_with_trace(grid_images, path="masked")
        assert torch.equal(t_fast.active, t_masked.active) and (t_fast.active[:, 1:] & ~t_fast.active[:, :-1]).any()
        torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-5)
        x, rows = peer._peer_embed(grid_images)
        k = round(0.4 * n)
        top = torch.randperm(n)[:k].expand(x.shape[0], -1)
        index = select_topk(n, k, p, index=top).index
        tokens = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        own = rows.gather(1, top[..., None].expand(-1, -1, rows.shape[-1]))
        ours = peer._peer_attend(peer.blocks[1], tokens, own)[0]
        torch.testing.assert_close(ours, peer.blocks[1](tokens, rope=own[:, None]), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours, peer.blocks[1](tokens, rope=own.flip(1)[:, None]), atol=1e-4)
        # the map the token cut reads is the block's own attention: its class row is the returned one
        _, cls_attn, weights = eva_attend(peer.blocks[1], x, rows[:, None], p, need_weights=True)
        torch.testing.assert_close(weights[:, :, 0].mean(dim=1), cls_attn)
    peer.train()
    logits, trace = peer.forward_with_trace(grid_images)
    loss = logits.logsumexp(-1).mean() + peer.reduction_loss(trace, {})["total"]
    loss.backward()
    assert trace.extras["token_cut"] > 0 and peer.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", list(ROTARY))
def test_dynamicvit_on_a_rotary_model_keeps_each_kept_tokens_own_rotary_row(variant, grid_images):
    """DynamicViT on an Eva: the fast path (dropped tokens removed, the kept ones with their rotary rows gathered)
    gives the masked path's class token (every token with the whole table, dropped keys masked), and it trains
    (straight-through keep decisions, keep-ratio loss) with gradients into its predictors."""
    from tpcvit.baselines import as_peer

    name, kw = ROTARY[variant]
    peer = as_peer(_rotary(name, **kw), "dynamicvit", keep_rate=0.6)
    with torch.no_grad():
        fast, t_fast = peer._run(grid_images, path="fast")
        masked, t_masked = peer._run(grid_images, path="masked")
    assert torch.equal(t_fast.active, t_masked.active) and t_fast.active[:, -1].float().mean() < 0.5
    torch.testing.assert_close(fast[:, 0], masked[:, 0], rtol=1e-4, atol=1e-5)
    peer.train()
    logits, trace = peer.forward_with_trace(grid_images)
    loss = logits.logsumexp(-1).mean() + peer.reduction_loss(trace, {"alpha_budget": 2.0})["total"]
    loss.backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in peer.reduction_parameters())
    assert any(q.grad.abs().sum() > 0 for q in peer.reduction_parameters())


@pytest.mark.parametrize("variant", list(ROTARY))
def test_avit_on_a_rotary_model_halts_tokens_that_keep_their_rotary_rows(variant, grid_images):
    """A-ViT on an Eva: never halting, the original logits; halting, the gathered path (each image's running
    tokens, padded to the batch, with their rotary rows) equals the masked path and an image alone, tokens halt for
    good, and the per-image GMACs of the trace are what the FLOP counter counts."""
    from tpcvit.baselines import as_peer

    name, kw = ROTARY[variant]
    original = _rotary(name, **kw)
    peer = as_peer(_rotary(name, **kw), "avit", halt_threshold=4.0)  # 4 blocks: nothing halts before the last
    with torch.no_grad():
        torch.testing.assert_close(peer(grid_images), original(grid_images), rtol=1e-5, atol=1e-5)
        torch.nn.init.normal_(peer.halting.weight, std=0.5)  # trained-like halting: scores differ per token
        torch.nn.init.constant_(peer.halting.bias, -1.0)
        peer.set_budget(0.6)
        fast, t_fast = peer._run(grid_images, path="fast")
        masked, t_masked = peer._run(grid_images, path="masked")
        alone, _ = peer._run(grid_images[:1], path="fast")
    a = t_fast.active
    assert torch.equal(a, t_masked.active) and 0.2 < a.float().mean() < 0.95 and (a[:, 1:] <= a[:, :-1]).all()
    assert a[:, 1].sum(dim=1).unique().numel() > 1  # images differ: the batch ran padded
    running = a[:, -1, :, None]  # the tokens the last block ran: the same features on both paths
    p = peer.num_prefix_tokens
    torch.testing.assert_close(fast[:, :p], masked[:, :p], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[:, p:] * running, masked[:, p:] * running, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, fast[:1], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        _, trace = peer.forward_with_trace(grid_images)
    assert peer.gmacs_per_image(trace).mean().item() == pytest.approx(count_gmacs(peer, grid_images), rel=0.01)


def test_bench_compares_tpc_with_tome_and_evit_on_a_rotary_model_by_name():
    """``tpcvit bench --model vit_small_patch16_rope_224 --methods dense,tpc-free@0.5,tome@0.5,evit@0.5``: every
    method built on the Eva backbone, each matched to half the GMACs."""
    from tpcvit.compare import build_variant, parse_spec
    from tpcvit.config import load_config

    cfg = load_config(None, ["model.name=vit_small_patch16_rope_224", "model.kwargs={img_size: 32, patch_size: 4, "
                             "embed_dim: 48, depth: 4, num_heads: 2}"])
    for spec in ("tome=6", "evit=0.5", "idlevit=0.5", "dynamicvit=0.7"):
        model = build_variant(cfg, parse_spec(spec), 10, {})
        assert type(model).__name__.startswith(("ToMe", "EViT", "IdleViT", "DynamicViT")) and "Eva" in type(
            model).__name__


def test_tome_on_a_rotary_model_merges_rotary_rows_with_the_tokens_plan(grid_images):
    """A ToMe block on an Eva: the merged tokens' rotary rows are the size-weighted means of their members' rows
    under the very plan that merged the tokens (the keys attention compared), and the next block attends with
    them: timm's EvaBlock given those rows and the size bias gives the same tokens."""
    from tpcvit.baselines import as_peer
    from tpcvit.layers import eva_attention_half

    name, kw = ROTARY["RoPE ViT"]
    peer = as_peer(_rotary(name, **kw), "tome", tome_r=8)
    p, r = peer.num_prefix_tokens, 8
    with torch.no_grad():
        x, rows = peer._peer_embed(grid_images)
        size = x.new_ones(*x.shape[:2], 1)
        _, _, k = eva_attention_half(peer.blocks[0], x, rows[:, None], p)
        plan = bipartite_plan(k[:, :, p:].mean(dim=1), r)
        expected = merge_weighted(rows, size[:, p:], plan)[0]
        x1, size1, rows1 = peer._block(peer.blocks[0], x, size, r, rows)
        torch.testing.assert_close(rows1, expected)
        bias = size1.squeeze(-1).log()[:, None, None, :]
        ours = peer._block(peer.blocks[1], x1, size1, 0, rows1)[0]
        timms = peer.blocks[1](x1, rope=expected[:, None], attn_mask=bias)
    assert rows1.shape[1] == x1.shape[1] - p == rows.shape[1] - r
    torch.testing.assert_close(ours, timms, rtol=1e-5, atol=1e-5)
