"""LV-ViT and Swin: the same guarantees as DeiT (dense equivalence, masked == fast, traces, FLOPs)."""

import pytest
import timm
import torch

import tpcvit
from tpcvit import count_gmacs, override_probs, set_mode
from tpcvit.models.lvvit import token_labeling_loss

SWIN_SMALL = dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                  num_classes=5)
LVVIT_SMALL = dict(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2, num_classes=5)


def _assert_controller_off_is_dense(model, dense):
    """Dense mode is exactly the backbone; adaptive with pause probability 0 computes every token."""
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        set_mode(model, "dense")
        assert torch.equal(model(x), dense(x))
        set_mode(model, "adaptive")
        with override_probs(model, pause=0.0):
            torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params,gmacs", [("lvvit_s", 26.2, 6.6), ("lvvit_m", 55.8, 12.7)])
def test_lvvit_matches_the_official_size_and_cost(name, params, gmacs):
    model = timm.create_model(name).eval()
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, rel=0.01)
    assert count_gmacs(model, torch.zeros(1, 3, 224, 224)) == pytest.approx(gmacs, rel=0.02)


def test_lvvit_keys_follow_the_official_release():
    keys = set(timm.create_model("lvvit_s", depth=1).state_dict())
    for key in ("patch_embed.conv1.weight", "patch_embed.bn1.running_mean", "patch_embed.conv3.weight",
                "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "aux_head.weight",
                "head.weight", "cls_token", "pos_embed", "norm.weight"):
        assert key in keys, key
    assert "blocks.0.attn.qkv.bias" not in keys and not any("ls1" in k for k in keys)


def test_dense_lvvit_checkpoint_loads_and_controller_off_is_exactly_dense(tmp_path):
    torch.manual_seed(0)
    dense = timm.create_model("lvvit_s", **LVVIT_SMALL).eval()
    tpcvit.save_weights(dense, tmp_path / "lvvit.safetensors")
    model = timm.create_model("tpc_lvvit_s", **LVVIT_SMALL).eval()
    tpcvit.load_backbone(model, tmp_path / "lvvit.safetensors")
    _assert_controller_off_is_dense(model, dense)


def test_lvvit_masked_equals_fast_and_counts_its_stem_and_aux_head():
    torch.manual_seed(0)
    model = timm.create_model("tpc_lvvit_s", **LVVIT_SMALL, pause_bias_init=0.0, restart_bias_init=0.0).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        fast, tf = model.forward_with_trace(x, path="fast")
        masked, tm = model.forward_with_trace(x, path="masked")
    assert torch.equal(tf.active, tm.active) and 0.1 < tf.active[:, 1:].float().mean() < 0.95
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-5)
    assert model.gmacs_per_image(tf).mean().item() == pytest.approx(count_gmacs(model, x), rel=0.01)


def test_token_labeling_objective_trains_both_heads():
    torch.manual_seed(0)
    model = timm.create_model("lvvit_s", **LVVIT_SMALL).train()
    cls_logits, aux = model(torch.randn(2, 3, 64, 64), token_logits=True)
    assert cls_logits.shape == (2, 5) and aux.shape == (2, 16, 5)
    token_targets = torch.softmax(torch.randn(2, 16, 5), dim=-1)
    token_labeling_loss(cls_logits, aux, torch.tensor([1, 3]), token_targets).backward()
    assert model.aux_head.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="token_targets"):
        token_labeling_loss(cls_logits, aux, torch.tensor([1, 3]), token_targets[:, :5])


def _swin(**kw):
    torch.manual_seed(0)
    return timm.create_model("tpc_swin_tiny_patch4_window7_224", **{**SWIN_SMALL, **kw})


def test_swin_controller_off_is_exactly_timm_swin():
    model = _swin().eval()
    dense = timm.create_model("swin_tiny_patch4_window7_224", **SWIN_SMALL).eval()
    tpcvit.load_backbone(model, dense.state_dict())
    _assert_controller_off_is_dense(model, dense)


def test_swin_masked_equals_fast_for_fixed_and_own_decisions():
    model = _swin(pause_bias_init=0.0, restart_bias_init=0.0).eval()
    x = torch.randn(3, 3, 64, 64)
    torch.manual_seed(3)
    forced = [torch.ones(3, 256, dtype=torch.bool)] + [torch.rand(3, n) > 0.5 for n in (256, 64, 64)]
    with torch.no_grad():
        fast, tf = model.forward_with_trace(x, forced_active=forced, path="fast")
        masked, tm = model.forward_with_trace(x, forced_active=forced, path="masked")
        torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-5)
        assert torch.equal(tf.stages[1].active[:, 0], forced[2])
        fast, tf = model.forward_with_trace(x, path="fast")
        masked, tm = model.forward_with_trace(x, path="masked")
    assert torch.equal(tf.active, tm.active) and 0.1 < tf.active[:, 1:].float().mean() < 0.95
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-5)
    assert tf.active.shape == (3, 4, 256)  # every block on the first stage's 16x16 grid


def test_swin_forward_intermediates_are_timms_when_dense_and_keep_paused_tokens_under_tpc():
    """Each stage's map (detection / segmentation necks): timm's own in dense mode for every argument; under TPC
    the last stage's map is what ``forward_features`` computes (before its norm), and ``stop_early`` changes no
    map."""
    model = _swin().eval()
    dense = timm.create_model("swin_tiny_patch4_window7_224", **SWIN_SMALL).eval()
    tpcvit.load_backbone(model, dense.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        set_mode(model, "dense")
        for kwargs in ({}, {"indices": 1, "norm": True},
                       {"indices": [0], "stop_early": True, "intermediates_only": True},
                       {"indices": [0, 1], "norm": True, "intermediates_only": True}):
            ours, theirs = model.forward_intermediates(x, **kwargs), dense.forward_intermediates(x, **kwargs)
            if isinstance(ours, tuple):
                assert torch.equal(ours[0], theirs[0])
                ours, theirs = ours[1], theirs[1]
            assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
        # stopped after stage 0: its buffer, unnormed (the norm fits the last stage; timm 1.0.31 returns the
        # same, 1.0.17 fails in its own norm)
        final, maps = model.forward_intermediates(x, indices=[0], stop_early=True)
        assert torch.equal(final.permute(0, 3, 1, 2), maps[0])
        set_mode(model, "budget", keep=0.5)
        final, maps = model.forward_intermediates(x)
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        feats = model.forward_features(x)
        dense_maps = dense.forward_intermediates(x, intermediates_only=True)
    assert torch.equal(final, feats) and torch.equal(first[0], maps[0])
    assert [m.shape for m in maps] == [(2, 32, 16, 16), (2, 64, 8, 8)]
    assert not torch.allclose(maps[1], dense_maps[1])


def test_swin_paused_tokens_keep_their_features_through_a_block():
    model = _swin().eval()
    blk = model.layers[0].blocks[1]
    x = torch.randn(2, 16, 16, 32)
    active = torch.rand(2, 256) > 0.5
    with torch.no_grad():
        out = tpcvit.layers.sparse_swin_block(blk, x, active)
        full = blk(x)
    keep = active.view(2, 16, 16)
    assert torch.equal(out[~keep], x[~keep])
    torch.testing.assert_close(out[keep], full[keep], rtol=1e-5, atol=1e-6)


def test_swin_budget_runs_k_tokens_per_block_and_counts_the_work_done():
    model = _swin().eval()
    x = torch.randn(2, 3, 64, 64)
    set_mode(model, "budget", 0.25)
    with torch.no_grad():
        _, trace = model.forward_with_trace(x)
    assert trace.stages[0].active[:, 1].sum(dim=1).tolist() == [64, 64]
    assert trace.stages[1].active.sum(dim=2).tolist() == [[16, 16], [16, 16]]
    counted = count_gmacs(model, x)
    assert model.gmacs_per_image(trace).mean().item() == pytest.approx(counted, rel=0.01)
    set_mode(model, "dense")
    assert counted < 0.8 * count_gmacs(model, x)


def test_swin_trains_every_controller_parameter():
    model = _swin(pause_bias_init=0.0).train()
    logits, trace = model.forward_with_trace(torch.randn(2, 3, 64, 64))
    loss = logits.square().mean() + model.reduction_loss(trace, {"alpha_budget": 1.0, "alpha_dist": 1.0})["total"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if n.startswith(("controller", "stabilizers")) and
               (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, missing


def _lvvit(**kw):
    torch.manual_seed(0)
    return timm.create_model("tpc_lvvit_s", **{**LVVIT_SMALL, "pause_bias_init": 0.0, "restart_bias_init": 0.0,
                                              **kw}).eval()


def test_lvvit_masked_equals_fast_with_forced_decisions():
    model = _lvvit()
    x = torch.randn(3, 3, 64, 64)
    torch.manual_seed(4)
    forced = torch.rand(3, 4, 16) > 0.5
    forced[:, 0] = True  # block 0 is before start_layer: always dense
    with torch.no_grad():
        fast, tf = model.forward_with_trace(x, forced_active=forced, path="fast")
        masked, tm = model.forward_with_trace(x, forced_active=forced, path="masked")
    assert torch.equal(tf.active, forced) and torch.equal(tm.active, forced)
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-5)


def test_lvvit_packed_equals_padded_in_adaptive_batches():
    model = _lvvit()
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        packed, tp = model.forward_with_trace(x)
        padded, tq = model.forward_with_trace(x, policy=tpcvit.ExecutionPolicy(packed=False))
    assert torch.equal(tp.active, tq.active)
    counts = tp.active[:, 1:].sum(dim=2)
    assert (counts != counts[:1]).any()  # images keep different numbers of tokens: padding is really needed
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["adaptive", "budget"])
@pytest.mark.parametrize("family", ["lvvit", "swin"])
def test_an_image_alone_gets_what_it_gets_in_a_batch(family, mode):
    """Fast path: an image's logits and decisions do not depend on the other images of its batch."""
    model = _lvvit() if family == "lvvit" else _swin(pause_bias_init=0.0, restart_bias_init=0.0).eval()
    set_mode(model, mode, 0.5 if mode == "budget" else None)
    torch.manual_seed(5)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        batch, tb = model.forward_with_trace(x)
        for i in range(4):
            alone, ta = model.forward_with_trace(x[i:i + 1])
            torch.testing.assert_close(alone, batch[i:i + 1], rtol=1e-4, atol=1e-5)
            assert torch.equal(ta.active, tb.active[i:i + 1])
    assert not tb.active.all()


@pytest.mark.parametrize("mode", ["adaptive", "budget"])
def test_eval_with_gradients_decides_like_inference_and_trains_the_controller(mode):
    """Propagation.step's non-lean eval branch (grad enabled, no Gumbel noise): the same decisions and logits as
    inference, with straight-through states that carry gradient to the controller heads."""
    model = _lvvit()
    set_mode(model, mode, 0.5 if mode == "budget" else None)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref, t_ref = model.forward_with_trace(x)
    out, trace = model.forward_with_trace(x)  # grad enabled, eval mode
    assert torch.equal(trace.active, t_ref.active) and not trace.active.all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert trace.states.requires_grad and trace.states.shape[1] == 3
    loss = model.reduction_loss(trace, {"alpha_budget": 1.0, "alpha_dist": 1.0})["total"]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.controller.parameters())
