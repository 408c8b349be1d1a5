"""tpcvit.patch on timm ViTs a user already has, the training-free controller, and pretrained=True offline."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import tpcvit
from tpcvit import count_gmacs, set_mode
from tpcvit.runtime import current_policy

VARIANTS = {  # the timm ViT variants users run, small
    "deit": ("deit_small_patch16_224", {}),
    "deit distilled": ("deit_small_distilled_patch16_224", {}),
    "register tokens": ("vit_small_patch16_224", {"reg_tokens": 4}),
    "avg pool, no class token": ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "narrow, shallow": ("vit_small_patch16_224", {"embed_dim": 96, "depth": 4, "num_heads": 2}),
    # rotary position embeddings (timm's Eva; LayerScale at 1 so that every block changes the tokens visibly)
    "EVA-02 (RoPE, SwiGLU)": ("eva02_tiny_patch14_224", {}),
    "DINOv3 (RoPE, registers)": ("vit_small_patch16_dinov3", {"dynamic_img_size": False, "init_values": 1.0}),
    "RoPE per block and head": ("vit_small_patch16_rope_mixed_224", {"init_values": 1.0}),
    "Perception Encoder (attention pool)": ("vit_pe_core_small_patch16_384", {}),
}
VARIANTS = {k: v for k, v in VARIANTS.items() if timm.is_model(v[0])}  # DINOv3 and PE: not in the oldest timm


def _model(name, **kw):
    torch.manual_seed(0)
    base = {"img_size": 64, "num_classes": 7, **kw}
    if "embed_dim" not in kw:
        base.update(embed_dim=96, depth=6, num_heads=3)
    model = timm.create_model(name, **base).eval()
    if hasattr(model, "rope"):  # sharp attention: at timm's init the logits are ~0 and any key order looks alike,
        with torch.no_grad():  # so a token given another token's rotary position would go unnoticed
            for blk in model.blocks:
                width = blk.attn.proj.in_features
                blk.attn.qkv.weight[:2 * width] *= 4
            torch.nn.init.normal_(model.head.weight, std=model.embed_dim ** -0.5)  # timm's Eva head: ~1e-4 logits
    return model


def _fast_equals_masked(model, images):
    """The gathered path against the masked one on ``images``: the same decisions, the same outputs. Returns the
    fast path's ``(logits, trace)``."""
    with torch.no_grad():
        fast, t_fast = model.forward_with_trace(images, path="fast")
        masked, t_masked = model.forward_with_trace(images, path="masked")
    assert torch.equal(t_fast.active, t_masked.active)
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-5)
    return fast, t_fast


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_patch_keeps_weights_and_keys_and_dense_mode_is_the_original_model(variant, x):
    name, kw = VARIANTS[variant]
    model = _model(name, **kw)
    with torch.no_grad():
        ref = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert tpcvit.patch(model, keep=0.5) is model
    assert list(model.state_dict()) == list(state)  # training-free: no new parameters, same keys
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        reduced = model(x)
        torch.testing.assert_close(set_mode(model, "dense")(x), ref, rtol=1e-5, atol=1e-5)
    assert reduced.shape == ref.shape and not torch.allclose(reduced, ref)


def test_patch_and_learned_controller_keep_each_part_in_its_own_mode(x):
    """Converting in place gives the new parts the model's mode and leaves the model's own parts as they were (a part
    frozen in eval mode inside a training model stays in eval mode), for the training-free patch and the learned
    controller alike (both convert in place)."""
    from tpcvit.patch import with_tpc

    for convert in (lambda m: tpcvit.patch(m, keep=0.5), with_tpc):
        for training in (True, False):
            model = _model("deit_tiny_patch16_224").train(training)
            model.blocks[0].train(not training)
            existing = {id(m) for m in model.modules()}
            convert(model)
            assert all(m.training != training for m in model.blocks[0].modules())
            assert model.blocks[1].training == training
            new = [m for m in model.modules() if id(m) not in existing]
            assert new and all(m.training == training for m in new)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["budget", "adaptive"])
def test_training_free_controller_masked_equals_fast_and_restarts(variant, mode, x):
    name, kw = VARIANTS[variant]
    model = tpcvit.patch(_model(name, **kw), keep=0.4, mode=mode, images=x)
    fast, t_fast = _fast_equals_masked(model, x)
    with torch.no_grad():
        alone, _ = model.forward_with_trace(x[:1], path="fast")
    torch.testing.assert_close(alone, fast[:1], rtol=1e-4, atol=1e-5)
    start = model.tpc_cfg.start_layer
    assert abs(t_fast.active[:, start:].float().mean().item() - 0.4) < 0.08  # budget, or calibrated threshold
    if mode == "budget":  # the default decay leaves the last of 3 controlled blocks 1 token: count restarts where
        tpcvit.set_policy(model, current_policy(model).replace(keep_profile=None))  # every block keeps 40%
        with torch.no_grad():
            t_fast = model.forward_with_trace(x, path="fast")[1]
    assert t_fast.restarted[:, start + 1:].any()  # paused tokens come back when their attention rises


def test_gmacs_target_and_trace_and_count(x):
    model = tpcvit.patch(_model("deit_small_patch16_224"), gmacs=0.5)
    dense = count_gmacs(set_mode(model, "dense"), x)
    set_mode(model, "budget", model.tpc_cfg.target_keep)
    got = count_gmacs(model, x)
    assert got / dense == pytest.approx(0.5, abs=0.03)
    with torch.no_grad():
        _, trace = model.forward_with_trace(x)
    assert model.gmacs_per_image(trace).mean().item() == pytest.approx(got, rel=0.01)  # analytic == counted
    keep_half = tpcvit.patch(_model("deit_small_patch16_224"), keep=0.5)
    assert 0.5 < count_gmacs(keep_half, x) / dense < 0.8  # paused tokens still pay for their keys/values


@pytest.mark.parametrize("mode", ["budget", "adaptive"])
def test_patch_deciding_every_few_blocks_still_hits_its_target(x, mode):
    """decide_every=2: the attention controller decides in controlled blocks 1, 3, 5 only (6 blocks, start 1); the
    GMACs target (budget) or mean keep (adaptive) is still met, masked == fast."""
    kwargs = {"gmacs": 0.5} if mode == "budget" else {"keep": 0.5, "images": x}
    model = tpcvit.patch(_model("deit_small_patch16_224"), mode=mode, decide_every=2, **kwargs)
    assert tpcvit.runtime.current_policy(model).decide_every == 2
    with torch.no_grad():
        fast, trace = model.forward_with_trace(x)
        masked, tm = model.forward_with_trace(x, path="masked")
    assert torch.equal(trace.active, tm.active) and torch.allclose(fast, masked, atol=1e-4, rtol=1e-4)
    assert torch.equal(trace.active[:, 2], trace.active[:, 1]) and torch.equal(trace.active[:, 4], trace.active[:, 3])
    if mode == "budget":
        dense = count_gmacs(set_mode(tpcvit.patch(_model("deit_small_patch16_224")), "dense"), x)
        assert count_gmacs(model, x) / dense == pytest.approx(0.5, abs=0.03)
    else:
        assert trace.active[:, 1:].float().mean().item() == pytest.approx(0.5, abs=0.08)


def test_at_deits_14x14_grid_paused_keys_are_pooled_per_window_and_the_gmacs_target_holds():
    images = torch.randn(4, 3, 224, 224)
    model = tpcvit.patch(_model("deit_small_patch16_224", img_size=224, embed_dim=48, depth=4, num_heads=2),
                         gmacs=0.4, images=images)
    assert model.tpc_cfg.paused_key_pool == 2  # 14 x 14 grid: 2 x 2 windows (tpcvit.patch.default_key_pool)
    got = count_gmacs(model, images) / count_gmacs(set_mode(model, "dense"), images)
    assert got == pytest.approx(0.4, abs=0.03)  # every window's pooled key counted: static cost, like per-token keys
    assert tpcvit.patch(_model("deit_small_patch16_224"), keep=0.5).tpc_cfg.paused_key_pool == 1  # 4 x 4 grid
    nocls = _model("vit_small_patch16_224", img_size=224, embed_dim=48, depth=4, num_heads=2, class_token=False,
                   global_pool="avg")
    assert tpcvit.patch(nocls, keep=0.5).tpc_cfg.paused_key_pool == 1  # pooled keys are read by a class token
    own = tpcvit.patch(_model("deit_small_patch16_224", img_size=224, embed_dim=48, depth=4, num_heads=2),
                       keep=0.5, paused_key_pool=1)
    assert own.tpc_cfg.paused_key_pool == 1  # the user's choice stands


def test_decay_profile_falls_geometrically_with_mean_one():
    from tpcvit.patch import decay_profile

    profile = decay_profile(5, 4.0)
    assert sum(profile) / 5 == pytest.approx(1.0, abs=1e-3)
    assert all(a > b for a, b in zip(profile, profile[1:]))
    assert profile[0] / profile[-1] == pytest.approx(torch.e ** 4, rel=1e-2)
    assert decay_profile(5, 0.0) == (1.0,) * 5 and decay_profile(1, 3.0) == (1.0,)


def test_keep_is_the_mean_share_even_where_the_schedule_asks_a_block_for_more_than_all_its_tokens():
    from tpcvit.patch import decay_profile
    from tpcvit.policy import spread_keep

    profile = decay_profile(9, 4.0)  # first factor ~3.6: above 1 / keep for every keep over 0.28
    assert spread_keep(0.2, profile) == tuple(0.2 * f for f in profile)  # nothing clamped: the plain product
    for keep in (0.3, 0.5, 0.8, 1.0):
        spread = spread_keep(keep, profile)
        assert sum(spread) / 9 == pytest.approx(keep, abs=1e-9) and max(spread) <= 1.0
        assert list(spread) == sorted(spread, reverse=True)  # the schedule's order is kept
        free = [s for s in spread if s < 1.0]  # the unclamped blocks keep the schedule's ratios
        assert all(a / b == pytest.approx(f / g) for a, b, f, g in zip(free, free[1:], profile[9 - len(free):],
                                                                        profile[10 - len(free):]))
    assert spread_keep(1.0, profile) == (1.0,) * 9


def test_patched_model_at_keep_one_is_the_dense_model_and_keep_is_the_mean_share_of_tokens(x):
    model = _model("deit_small_patch16_224", depth=8)
    with torch.no_grad():
        dense = model(x)
        tpcvit.patch(model, keep=0.5)  # the default decay schedule: its first factors exceed 1 / 0.5
        start, n = model.tpc_cfg.start_layer, model.patch_embed.num_patches
        counts = model.forward_with_trace(x)[1].active[0, start:].sum(-1).float()
        assert counts[0] == n and counts.mean() / n == pytest.approx(0.5, abs=0.5 / n)
        set_mode(model, "budget", keep=1.0)
        assert torch.equal(model(x), dense)  # every token in every block: the model the user had


def test_budget_schedule_spreads_tokens_and_still_matches_the_gmacs_target(x):
    uniform = tpcvit.patch(_model("deit_small_patch16_224"), gmacs=0.5, schedule="uniform")
    decayed = tpcvit.patch(_model("deit_small_patch16_224"), gmacs=0.5)  # default: geometric decay
    dense = count_gmacs(_model("deit_small_patch16_224"), x)
    start = decayed.tpc_cfg.start_layer
    with torch.no_grad():
        counts = {name: m.forward_with_trace(x)[1].active[0, start:].sum(-1).tolist()
                  for name, m in (("uniform", uniform), ("decayed", decayed))}
    assert len(set(counts["uniform"])) == 1  # the same keep in every controlled block
    assert counts["decayed"] == sorted(counts["decayed"], reverse=True) and counts["decayed"][0] > counts["decayed"][-1]
    for m in (uniform, decayed):
        assert count_gmacs(m, x) / dense == pytest.approx(0.5, abs=0.03)
    assert decayed.tpc_policy.keep_profile is not None and uniform.tpc_policy.keep_profile is None
    set_mode(decayed, "budget", decayed.tpc_cfg.target_keep / 2)  # moving the keep keeps the schedule
    assert decayed.tpc_policy.keep_profile is not None and count_gmacs(decayed, x) / dense < 0.5


def test_auto_schedule_picks_the_decay_closest_to_the_dense_predictions(x):
    from tpcvit.patch import AUTO_DECAYS, decay_profile

    def kl(model):
        with torch.no_grad():
            out = torch.log_softmax(model(x), -1)
            ref = torch.log_softmax(_model("deit_small_patch16_224")(x), -1)
        return torch.nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean").item()

    auto = tpcvit.patch(_model("deit_small_patch16_224"), gmacs=0.5, schedule="auto", images=x)
    blocks = len(auto.blocks) - auto.tpc_cfg.start_layer
    assert auto.tpc_policy.keep_profile in [decay_profile(blocks, d) for d in AUTO_DECAYS]
    others = [kl(tpcvit.patch(_model("deit_small_patch16_224"), gmacs=0.5, schedule=d)) for d in AUTO_DECAYS]
    assert kl(auto) == pytest.approx(min(others), rel=1e-4)
    with pytest.raises(ValueError, match="needs images="):
        tpcvit.patch(_model("deit_small_patch16_224"), schedule="auto")
    with pytest.raises(ValueError, match="keep factors for"):
        tpcvit.patch(_model("deit_small_patch16_224"), schedule=(1.0, 1.0))
    with pytest.raises(ValueError, match="schedule must be"):
        tpcvit.patch(_model("deit_small_patch16_224"), schedule="fast")


def test_learned_controller_adds_heads_that_fine_tune(x):
    model = tpcvit.patch(_model("deit_small_patch16_224"), keep=0.5, controller="learned", start_layer=1)
    added = {k.split(".")[0] for k in model.state_dict()} - {k.split(".")[0] for k in _model(
        "deit_small_patch16_224").state_dict()}
    assert added == {"controller", "stabilizers"}
    model.train()
    logits, trace = model(x, return_trace=True)
    loss = logits.logsumexp(-1).mean() + model.reduction_loss(trace, {"alpha_budget": 1.0, "alpha_dist": 0.1})["total"]
    loss.backward()
    assert all(p.grad is not None for p in model.controller.parameters())


def test_hybrid_controller_starts_as_the_training_free_one_and_learns(x):
    free = tpcvit.patch(_model("deit_small_patch16_224"), keep=0.4, start_layer=1)
    hybrid = tpcvit.patch(_model("deit_small_patch16_224"), keep=0.4, start_layer=1, controller="hybrid",
                          stabilizer=False)
    with torch.no_grad():
        a, ta = free.forward_with_trace(x)
        b, tb = hybrid.forward_with_trace(x)
    assert torch.equal(ta.active, tb.active)
    torch.testing.assert_close(a, b)
    hybrid.train()
    logits, trace = hybrid(x, return_trace=True)
    (logits.logsumexp(-1).mean() + hybrid.reduction_loss(trace, {"alpha_budget": 1.0, "alpha_dist": 0.1})["total"]
     ).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in hybrid.controller.parameters())


def test_unsupported_models_get_a_clear_error():
    with pytest.raises(TypeError, match="tpc_swin"):
        tpcvit.patch(timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=2, embed_dim=24,
                                       depths=(1, 1), num_heads=(1, 1)))
    eva = {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}
    with pytest.raises(ValueError, match="EvaBlockPostNorm"):
        tpcvit.patch(timm.create_model("vit_small_patch16_rope_224", use_post_norm=True, **eva))
    with pytest.raises(ValueError, match="patch_drop_rate=0"):
        tpcvit.patch(timm.create_model("vit_small_patch16_rope_224", patch_drop_rate=0.5, **eva))
    patched = tpcvit.patch(_model("deit_small_patch16_224"))
    with pytest.raises(ValueError, match="already has TPC"):
        tpcvit.patch(patched)
    from timm.models.vision_transformer import ParallelScalingBlock

    with pytest.raises(ValueError, match="ParallelScalingBlock"):
        tpcvit.patch(_model("vit_small_patch16_224", block_fn=ParallelScalingBlock))
    with pytest.raises(ValueError, match="needs images="):
        tpcvit.patch(_model("deit_small_patch16_224"), mode="adaptive")


@pytest.mark.slow  # subprocess / ONNX / hub cache: the pipeline tier
def test_patched_model_exports_to_onnx_in_budget_mode(tmp_path, x):
    pytest.importorskip("onnxruntime")
    from tpcvit.export import export_onnx

    model = tpcvit.patch(_model("deit_small_patch16_224"), keep=0.5)
    report = export_onnx(model, tmp_path / "m.onnx", "budget", 0.5, 2)
    assert report.checked_batches and report.max_abs_diff < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in ("DINOv3 (RoPE, registers)", "RoPE per block and head")
                                     if v in VARIANTS])
def test_patched_rope_model_exports_to_onnx_in_budget_mode(tmp_path, x, variant):
    """The rotary rows gathered per selection are ONNX ops too (Gather on the table): onnxruntime gives PyTorch's
    logits (O(1) here: the test model's head is re-initialised, timm's gives ~1e-4)."""
    pytest.importorskip("onnxruntime")
    from tpcvit.export import export_onnx

    name, kw = VARIANTS[variant]
    model = tpcvit.patch(_model(name, **kw), keep=0.5)
    with torch.no_grad():
        assert model(x).abs().max() > 0.1
    report = export_onnx(model, tmp_path / "m.onnx", "budget", 0.5, 2)
    assert report.checked_batches and report.max_abs_diff < 1e-3


# ---------------------------------------------------------------------------------------------- pretrained=True
HUB_SCRIPT = r"""
import json, os, sys
import tpcvit, timm, torch
from safetensors.torch import load_file
name, expect = sys.argv[1], sys.argv[2]
model = timm.create_model(name, pretrained=True, **json.loads(sys.argv[3]))
cached = load_file(expect)
own = model.state_dict()
same = all(torch.equal(own[k], v) for k, v in cached.items() if k in own and own[k].shape == v.shape)
print(json.dumps({"same": same, "loaded": sum(k in own for k in cached), "cached": len(cached),
                  "added": sorted({k.split(".")[0] for k in own} - {k.split(".")[0] for k in cached}),
                  "hub_id": model.pretrained_cfg.get("hf_hub_id"), "arch": model.pretrained_cfg.get("architecture")}))
"""


def _hub_cache(root, repo: str, state: dict) -> str:
    """A Hugging Face hub cache laid out as huggingface_hub expects, holding one model.safetensors."""
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / "hub" / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    return str(snap / "model.safetensors")


@pytest.mark.parametrize("name,dense,kwargs", [
    ("tpc_deit_tiny_patch16_224", "deit_tiny_patch16_224", {}),
    ("tpc_deit_tiny_patch16_224", "deit_tiny_patch16_224", {"controller": "attention", "paused_keys": True}),
    ("idlevit_deit_tiny_patch16_224", "deit_tiny_patch16_224", {"keep_rate": 0.5}),
])
@pytest.mark.slow  # subprocess / ONNX / hub cache: the pipeline tier
def test_pretrained_true_loads_the_dense_weights_from_an_offline_hub_cache(tmp_path, name, dense, kwargs):
    cfg = timm.models.get_pretrained_cfg(dense)
    torch.manual_seed(3)
    weights = timm.create_model(dense).state_dict()
    path = _hub_cache(tmp_path, cfg.hf_hub_id, weights)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT, name, path, json.dumps(kwargs)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["same"] and got["loaded"] == got["cached"]  # every backbone tensor is the cached one
    assert got["hub_id"] == cfg.hf_hub_id and got["arch"] == name
    if "controller" not in kwargs and name.startswith("tpc_"):
        assert got["added"] == ["controller", "stabilizers"]  # freshly initialised, not in the dense weights


@pytest.mark.slow  # subprocess / ONNX / hub cache: the pipeline tier
def test_pretrained_without_weights_anywhere_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", "import tpcvit, timm; timm.create_model('tpc_lvvit_s', "
                          "pretrained=True)"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "tpcvit.load_backbone" in out.stderr


def test_attention_pool_head_models_patch_and_count(x):
    """SigLIP-style heads (a learned latent query, no class token): patched, counted, keep 1.0 the original. Counting
    failed before (torch's flop counter tracked a view of the latent parameter as needing grad)."""
    model = _model("vit_small_patch16_224", class_token=False, global_pool="map")
    with torch.no_grad():
        original, dense = model(x), count_gmacs(model, x)
        tpcvit.patch(model, keep=0.5)
        assert count_gmacs(model, x) < dense
        set_mode(model, "budget", keep=1.0)
        assert torch.equal(model(x), original)
    assert all(p.requires_grad for p in model.parameters())  # counting gives the parameters back as they were


def test_with_tpc_is_the_registered_tpc_model_on_deit_and_fine_tunes_any_timm_vit(x):
    """``with_tpc`` (and ``model.name: tpc_<any timm vit>`` in the harness) gives the learned TPC of the ``tpc_*``
    models to a backbone none is registered for; on DeiT it is the registered model."""
    from tpcvit.config import load_config
    from tpcvit.engine import build_model

    kw = dict(img_size=64, embed_dim=96, depth=6, num_heads=3, num_classes=7)
    torch.manual_seed(0)
    registered = timm.create_model("tpc_deit_small_patch16_224", **kw, start_layer=2, target_keep=0.5).eval()
    converted = tpcvit.with_tpc(timm.create_model("deit_small_patch16_224", **kw),
                                tpcvit.TPCConfig(start_layer=2, target_keep=0.5)).eval()
    assert set(converted.state_dict()) == set(registered.state_dict())
    converted.load_state_dict(registered.state_dict())
    with torch.no_grad():
        for mode in ("adaptive", "budget"):
            set_mode(registered, mode), set_mode(converted, mode)
            (a, ta), (b, tb) = registered.forward_with_trace(x), converted.forward_with_trace(x)
            assert torch.equal(a, b) and torch.equal(ta.active, tb.active)
    cfg = load_config(None, ["model.name=tpc_vit_small_patch16_224", "model.kwargs={img_size: 64, embed_dim: 96, "
                             "depth: 4, num_heads: 3, reg_tokens: 2}", "model.tpc={start_layer: 1, target_keep: 0.4}"])
    model = build_model(cfg, 5).train()
    assert model.num_prefix_tokens == 3 and model.tpc_cfg.target_keep == 0.4 and len(model.controller) == 3
    logits, trace = model(x, return_trace=True)
    (logits.logsumexp(1).mean() + tpcvit.tpc_loss(trace, model.tpc_cfg, 1.0, 1.0)["total"]).backward()
    assert all(p.grad is not None for p in model.controller.parameters())


ROPE_VARIANTS = [v for v in VARIANTS if hasattr(_model(*VARIANTS[v][0:1], depth=1, embed_dim=32, num_heads=2), "rope")]


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
def test_learned_tpc_on_rope_models_trains_and_its_selection_carries_the_positions(variant, x):
    """``with_tpc`` on an ``Eva`` (no paused keys: each selected token runs the block alone with its own rows of
    the rotary table): it trains on the masked path, and the gathered fast path is the masked path in budget and
    adaptive mode, whose GMACs the trace gives as counted."""
    name, kw = VARIANTS[variant]
    model = tpcvit.with_tpc(_model(name, **kw), tpcvit.TPCConfig(start_layer=1, target_keep=0.5,
                                                                 pause_bias_init=0.0, restart_bias_init=0.0))
    logits, trace = model.train()(x, return_trace=True)
    (logits.logsumexp(1).mean() + tpcvit.tpc_loss(trace, model.tpc_cfg, 1.0, 1.0)["total"]).backward()
    assert all(p.grad is not None for p in model.controller.parameters())
    assert model.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        for mode in ("budget", "adaptive"):
            set_mode(model, mode, keep=0.5 if mode == "budget" else None)
            t_fast = _fast_equals_masked(model, x)[1]
            assert not t_fast.active[:, 1:].all()
            counted = count_gmacs(model, x)
            assert model.gmacs_per_image(t_fast).mean().item() == pytest.approx(counted, rel=0.01)
            assert counted < count_gmacs(set_mode(model, "dense"), x)


def test_bench_tpc_free_on_a_backbone_patch_refuses_is_a_config_error():
    """``tpcvit bench --methods tpc-free@0.5`` on such a backbone: the CLI's one-line error, not a traceback."""
    from tpcvit.compare import build_variant, parse_spec
    from tpcvit.config import ConfigError, load_config

    cfg = load_config(None, ["model.name=vit_small_patch16_rope_224", "model.kwargs={img_size: 32, patch_size: 8, "
                             "embed_dim: 32, depth: 2, num_heads: 2, patch_drop_rate: 0.5}"])
    with pytest.raises(ConfigError, match="tpc-free on vit_small_patch16_rope_224: .*patch_drop_rate=0"):
        build_variant(cfg, parse_spec("tpc-free@0.5"), 10, {})


def test_speed_breakdown_runs_rope_blocks_with_their_tables():
    """``block_parts`` times an Eva block on its selection with the selection's rotary rows (a block run without
    its table would time a different model)."""
    from tpcvit.breakdown import block_parts

    name, kw = VARIANTS["RoPE per block and head"]
    model = tpcvit.patch(_model(name, **kw), keep=0.5)
    tables = []
    model.blocks[model.tpc_cfg.start_layer].register_forward_pre_hook(
        lambda _m, _args, kwargs: tables.append(kwargs.get("rope")), with_kwargs=True)
    parts = block_parts(model, batch=1, keep=0.5, rounds=1, iters=1)
    assert parts["block on its selection (incl. gather/scatter)"] > 0 and parts["block on every token (dense)"] > 0
    assert tables and all(t is not None and t.shape[-2] == model.patch_embed.num_patches for t in tables)


@pytest.mark.parametrize("mode", ["budget", "adaptive"])
def test_rope_model_deciding_every_other_block_keeps_each_blocks_own_table(mode, x):
    """Blocks sharing one decision share its selection but not their rotary tables (per-block RoPE): the gathered
    path still equals the masked one."""
    name, kw = VARIANTS["RoPE per block and head"]
    model = tpcvit.patch(_model(name, **kw), keep=0.4, mode=mode, images=x, decide_every=2)
    _fast_equals_masked(model, x)


DYNAMIC = {  # timm models that take images of any size: DINOv3 by default, any ViT asked for it
    "ViT, dynamic_img_size=True, pooled paused keys": ("vit_small_patch16_224", {"dynamic_img_size": True},
                                                       {"paused_key_pool": 2}),
    "DINOv3 (timm's default: dynamic_img_size=True)": ("vit_small_patch16_dinov3", {"init_values": 1.0}, {}),
}
DYNAMIC = {k: v for k, v in DYNAMIC.items() if timm.is_model(v[0])}


def _other_size_images():
    torch.manual_seed(2)
    return torch.randn(3, 3, 48, 96)  # a 3 x 6 patch grid (the models are built for 64 x 64: 4 x 4)


@pytest.mark.parametrize("variant", list(DYNAMIC))
def test_dynamic_size_model_at_keep_one_is_the_original_at_any_size(variant, x):
    name, kw, options = DYNAMIC[variant]
    original = _model(name, **kw)
    assert original.dynamic_img_size
    patched = tpcvit.patch(_model(name, **kw), keep=1.0, **options)
    y = _other_size_images()
    with torch.no_grad():
        for images in (x, y):
            assert torch.equal(patched(images), original(images))


@pytest.mark.parametrize("variant", list(DYNAMIC))
@pytest.mark.parametrize("mode", ["budget", "adaptive"])
def test_dynamic_size_model_sizes_its_decisions_for_each_inputs_grid(variant, mode, x):
    """Patched at its native size, run on images of another size: the trace is on their 3 x 6 grid, the budget is
    a share of their tokens, the gathered path equals the masked one (pooled keys in windows cut at the grid's
    edge), an image alone equals it in the batch, and the GMACs the trace gives are those counted."""
    name, kw, options = DYNAMIC[variant]
    model = tpcvit.patch(_model(name, **kw), keep=0.4, mode=mode, images=x, schedule="uniform", **options)
    y = _other_size_images()
    fast, t_fast = _fast_equals_masked(model, y)
    with torch.no_grad():
        alone = model(y[:1])
    start = model.tpc_cfg.start_layer
    assert t_fast.grid == (3, 6) and t_fast.active.shape == (3, len(model.blocks), 18)
    assert not t_fast.active[:, start:].all()
    torch.testing.assert_close(alone, fast[:1], rtol=1e-4, atol=1e-5)
    if mode == "budget":
        assert (t_fast.active[:, start:].sum(-1) == round(0.4 * 18)).all()
    counted = count_gmacs(model, y)
    assert model.gmacs_per_image(t_fast).mean().item() == pytest.approx(counted, rel=0.01)
    assert counted < count_gmacs(set_mode(model, "dense"), y)


def test_learned_tpc_on_a_dynamic_size_model_trains_on_any_grid():
    """``with_tpc`` (controller heads, stabilizers on the token grid) trains on images of another size."""
    model = tpcvit.with_tpc(_model("vit_small_patch16_224", dynamic_img_size=True),
                            tpcvit.TPCConfig(start_layer=1, target_keep=0.5))
    y = _other_size_images()
    logits, trace = model.train()(y, return_trace=True)
    assert trace.grid == (3, 6)
    (logits.logsumexp(1).mean() + tpcvit.tpc_loss(trace, model.tpc_cfg, 1.0, 1.0)["total"]).backward()
    assert all(p.grad is not None for p in model.controller.parameters())
    assert all(p.grad is not None for p in model.stabilizers.parameters())
    _fast_equals_masked(set_mode(model.eval(), "budget", keep=0.5), y)


def test_dynamic_size_model_names_an_image_size_its_patches_do_not_tile():
    model = tpcvit.patch(_model("vit_small_patch16_224", dynamic_img_size=True), keep=0.5)
    with pytest.raises(ValueError, match=r"not a multiple of the patch size \[16, 16\].*dynamic_img_pad=True"):
        model(torch.randn(1, 3, 50, 64))
    padded = tpcvit.patch(_model("vit_small_patch16_224", dynamic_img_size=True, dynamic_img_pad=True), keep=0.5)
    with torch.no_grad():
        _, trace = padded.forward_with_trace(torch.randn(1, 3, 50, 64))
    assert trace.grid == (4, 4)  # timm pads 50 to 64


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return torch.equal(a, b)


INTERMEDIATES = {  # a ViT with registers (pooled paused keys), a RoPE model, a model taking any image size
    "register tokens": ("vit_small_patch16_224", {"reg_tokens": 2}, {"paused_key_pool": 2}),
    "RoPE per block and head": VARIANTS.get("RoPE per block and head", (None,)) + ({},),
    "any image size": ("deit_small_patch16_224", {"dynamic_img_size": True}, {}),
}
INTERMEDIATES = {k: v for k, v in INTERMEDIATES.items() if v[0] is not None}


@pytest.mark.parametrize("variant", list(INTERMEDIATES))
def test_forward_intermediates_at_keep_one_is_timms_for_every_argument(variant, x):
    """``forward_intermediates`` (dense prediction, ``features_only``): the patched model answers every argument
    timm's method takes exactly as the original model does."""
    import inspect

    name, kw, options = INTERMEDIATES[variant]
    original = _model(name, **kw)
    patched = tpcvit.patch(_model(name, **kw), keep=1.0, **options)
    has_dict = "output_dict" in inspect.signature(original.forward_intermediates).parameters
    with torch.no_grad():
        for indices in (None, 2, [1, -1]):
            for norm, fmt, prefix, only, stop, as_dict in [(False, "NCHW", False, False, False, False),
                                                           (True, "NLC", True, False, True, False),
                                                           (False, "NLC", True, True, False, False),
                                                           (True, "NCHW", False, True, True, False),
                                                           (False, "NCHW", True, False, False, True),
                                                           (True, "NLC", True, True, True, True)]:
                kwargs = {"indices": indices, "norm": norm, "output_fmt": fmt, "return_prefix_tokens": prefix,
                          "intermediates_only": only, "stop_early": stop}
                if as_dict and not has_dict:
                    continue
                if as_dict:
                    kwargs["output_dict"] = True
                assert _same(patched.forward_intermediates(x, **kwargs), original.forward_intermediates(x, **kwargs))


@pytest.mark.parametrize("variant", list(INTERMEDIATES))
@pytest.mark.parametrize("decide_every", [1, 3])
def test_forward_intermediates_under_tpc_keep_paused_tokens_and_change_nothing(variant, decide_every, x):
    """At keep 0.4: a paused token's features in a block's output are those it had before it (nothing
    recomputes them), the last block's map is what ``forward_features`` computes, tapping a block inside a
    group of blocks sharing one decision changes no result, and ``stop_early`` changes no intermediate."""
    name, kw, options = INTERMEDIATES[variant]
    model = tpcvit.patch(_model(name, **kw), keep=0.4, decide_every=decide_every, **options)
    prefix, depth = model.num_prefix_tokens, len(model.blocks)
    with torch.no_grad():
        feats = model.forward_features(x)
        _, trace = model.forward_with_trace(x)
        final, maps = model.forward_intermediates(x, output_fmt="NLC")
        early = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", stop_early=True,
                                            intermediates_only=True)
        last = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)[0]
    assert torch.equal(final, feats) and torch.equal(last, feats[:, prefix:])
    assert _same(early, [maps[1], maps[3]])
    start = model.tpc_cfg.start_layer
    paused = ~trace.active[:, start:]
    assert paused.any()
    for i in range(start, depth):
        frozen = ~trace.active[:, i]
        assert torch.equal(maps[i][frozen], maps[i - 1][frozen])
        assert not torch.equal(maps[i][~frozen], maps[i - 1][~frozen])


def test_features_only_model_patched_gives_timms_feature_maps_and_then_tpcs(x):
    """``timm.create_model(..., features_only=True)`` (timm's feature extractor around ``forward_intermediates``):
    patching the model inside it gives the same maps at keep 1.0 and whole maps at keep 0.5."""
    kw = {"img_size": 64, "embed_dim": 96, "depth": 6, "num_heads": 3}
    torch.manual_seed(0)
    extractor = timm.create_model("vit_small_patch16_224", features_only=True, out_indices=(2, 4), **kw).eval()
    with torch.no_grad():
        reference = extractor(x)
        tpcvit.patch(extractor.model, keep=1.0)
        assert _same(extractor(x), reference)
        set_mode(extractor.model, "budget", keep=0.5)
        reduced = extractor(x)
    assert [m.shape for m in reduced] == [m.shape for m in reference] == [(3, 96, 4, 4)] * 2
    assert not torch.allclose(reduced[1], reference[1])


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
@pytest.mark.parametrize("mode", ["budget", "adaptive"])
def test_rope_models_pool_paused_keys_at_their_windows_mean_rotation(variant, mode, x):
    """``paused_key_pool=2`` on a rotary model (opt-in): the gathered path equals the masked one, and where each
    2 x 2 window holds one paused token its pooled key is that token's own key, at its own rotation: the output
    equals per-token keys' (a pooled key at any other rotation, or none, fails this)."""
    name, kw = VARIANTS[variant]
    pooled = tpcvit.patch(_model(name, **kw), keep=0.4, mode=mode, images=x, paused_key_pool=2)
    t_fast = _fast_equals_masked(pooled, x)[1]
    counted = count_gmacs(pooled, x)
    assert pooled.gmacs_per_image(t_fast).mean().item() == pytest.approx(counted, rel=0.01)
    per_token = tpcvit.patch(_model(name, **kw), keep=0.4, mode=mode, images=x, paused_key_pool=1)
    depth, start = len(pooled.blocks), pooled.tpc_cfg.start_layer
    torch.manual_seed(5)
    forced = torch.ones(x.shape[0], depth, 16, dtype=torch.bool)  # the 4 x 4 grid: four 2 x 2 windows
    window = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
    for b in range(x.shape[0]):
        for layer in range(start, depth):
            forced[b, layer, window[torch.arange(4), torch.randint(0, 4, (4,))]] = False
    if mode == "budget":  # same keep, fewer keys
        assert counted < count_gmacs(per_token, x)
    with torch.no_grad():
        one, _ = pooled.forward_with_trace(x, forced_active=forced, path="fast")
        own, _ = per_token.forward_with_trace(x, forced_active=forced, path="fast")
    torch.testing.assert_close(one, own, rtol=1e-4, atol=1e-5)


def test_pooled_rotary_rows_are_the_mean_of_each_windows_paused_rows():
    from tpcvit.layers import pool_rope, spread_rope

    torch.manual_seed(0)
    for table in (torch.randn(16, 6), torch.randn(3, 16, 6)):  # shared, and per head
        paused = torch.rand(2, 16) > 0.5
        paused[0, [0, 1, 4, 5]] = torch.tensor([True, False, True, False])
        rows = pool_rope(table, paused, (4, 4), 2)
        heads = table if table.dim() == 3 else table[None]
        assert rows.shape == (2, heads.shape[0], 4, 6)
        torch.testing.assert_close(rows[0, :, 0], heads[:, [0, 4]].mean(dim=1))
        spread = spread_rope(table, paused.float(), (4, 4), 2)
        torch.testing.assert_close(spread[0, :, 0], rows[0, :, 0])  # paused: its window's rows
        torch.testing.assert_close(spread[0, :, 1], heads[:, 1])  # active: its own
