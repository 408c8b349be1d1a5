"""TPC DeiT: every registered model, dense equivalence, masked == fast, pause/restart semantics, modes."""

import pytest
import timm
import torch
from conftest import SMALL, small_tpc
from torch.utils._python_dispatch import TorchDispatchMode

import tpcvit
from tpcvit.runtime import current_policy

TPC_MODELS = timm.list_models("tpc_*")


def test_registry_has_all_deit_variants():
    for size in ("tiny", "small", "base"):
        assert f"tpc_deit_{size}_patch16_224" in TPC_MODELS
        assert f"tpc_deit_{size}_distilled_patch16_224" in TPC_MODELS


@pytest.mark.parametrize("name", TPC_MODELS)
def test_every_registered_model_builds_runs_and_trains(name):
    torch.manual_seed(0)
    small = dict(depths=(2, 2), num_heads=(2, 4), embed_dim=32, window_size=4) if "swin" in name else dict(depth=3)
    model = timm.create_model(name, img_size=64, num_classes=7, pause_bias_init=0.0, **small)
    x = torch.randn(3, 3, 64, 64)
    model.train()
    logits, trace = model.forward_with_trace(x)
    losses = tpcvit.tpc_loss(trace, model.tpc_cfg, alpha_budget=1.0, alpha_dist=1.0)
    (logits.square().mean() + losses["total"]).backward()
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == [], f"no gradient reaches {no_grad}"
    model.eval()
    with torch.no_grad():
        for mode, keep in (("dense", None), ("adaptive", None), ("budget", 0.3)):
            tpcvit.set_mode(model, mode, keep)
            out = model(x)
            assert out.shape == (3, 7) and torch.isfinite(out).all()


def test_controller_and_stabilizer_params_get_gradients_in_small_model(images):
    model = small_tpc()
    model.train()
    logits, trace = model.forward_with_trace(images)
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(6) % 5)
    loss = loss + tpcvit.tpc_loss(trace, model.tpc_cfg, 1.0, 1.0)["total"]
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("controller", "stabilizers")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not trace.active[:, model.tpc_cfg.start_layer:].all()  # decisions actually paused something


def _dense_twin(tmp_path, name="deit_small_patch16_224", tpc_name="tpc_deit_small_patch16_224", **extra):
    torch.manual_seed(3)
    dense = timm.create_model(name, **SMALL).eval()
    path = tmp_path / "dense.safetensors"
    tpcvit.save_weights(dense, path)
    tpc = timm.create_model(tpc_name, **SMALL, pause_bias_init=0.0, **extra)
    tpcvit.load_backbone(tpc, path)
    return dense, tpc.eval()


@pytest.mark.parametrize("distilled", [False, True])
def test_pause_probability_zero_gives_exactly_the_dense_timm_model(tmp_path, images, distilled):
    suffix = "_distilled" if distilled else ""
    dense, tpc = _dense_twin(tmp_path, f"deit_small{suffix}_patch16_224", f"tpc_deit_small{suffix}_patch16_224")
    with torch.no_grad():
        ref = dense(images)
        with tpcvit.override_probs(tpc, pause=0.0):
            out, trace = tpc.forward_with_trace(images)
        assert trace.active.all()
        assert torch.equal(out, ref)
        tpcvit.set_mode(tpc, "dense")
        assert torch.equal(tpc(images), ref)
        tpcvit.set_mode(tpc, "adaptive")
        assert not torch.equal(tpc(images), ref)  # the controller really pauses tokens here


def test_fresh_model_starts_close_to_dense():
    model = timm.create_model("tpc_deit_small_patch16_224", **SMALL).eval()  # default near-dense init
    with torch.no_grad():
        _, trace = model.forward_with_trace(torch.randn(4, 3, 32, 32))
    assert trace.keep_ratio().min() > 0.95


def test_masked_path_equals_fast_path_for_fixed_decisions(images):
    model = small_tpc().eval()
    b, depth, n = images.shape[0], 4, 16
    torch.manual_seed(5)
    forced = torch.rand(b, depth, n) > 0.5
    forced[:, : model.tpc_cfg.start_layer] = True
    with torch.no_grad():
        fast, tf = model.forward_with_trace(images, forced_active=forced, path="fast")
        masked, tm = model.forward_with_trace(images, forced_active=forced, path="masked")
        assert torch.equal(tf.active, forced) and torch.equal(tm.active, forced)
        assert torch.allclose(fast, masked, atol=1e-5, rtol=1e-4)
        # and with the controller's own (deterministic, eval) decisions
        fast, tf = model.forward_with_trace(images, path="fast")
        masked, tm = model.forward_with_trace(images, path="masked")
    assert torch.equal(tf.active, tm.active)
    assert 0.1 < tf.active[:, 1:].float().mean() < 0.95
    assert torch.allclose(fast, masked, atol=1e-5, rtol=1e-4)


def test_packed_adaptive_equals_padded_and_masked(images):
    model = small_tpc().eval()
    with torch.no_grad():
        packed, tp = model.forward_with_trace(images)
        padded, tq = model.forward_with_trace(images, policy=current_policy(model).replace(packed=False))
        masked, tm = model.forward_with_trace(images, path="masked")
    assert torch.equal(tp.active, tq.active) and torch.equal(tp.active, tm.active)
    assert not tp.active.all()
    assert torch.allclose(packed, padded, atol=1e-5, rtol=1e-4)
    assert torch.allclose(packed, masked, atol=1e-5, rtol=1e-4)


def _block_inputs(model, images, **kw):
    """Full-length token buffers entering each controlled block (the controller heads see them)."""
    seen = {}
    hooks = [head.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].clone()))
             for i, head in enumerate(model.controller)]
    out = model.forward_with_trace(images, **kw)
    for h in hooks:
        h.remove()
    return [seen[i] for i in sorted(seen)], out


@pytest.mark.parametrize("path", ["fast", "masked"])
def test_paused_tokens_are_frozen_and_restarted_tokens_resume(images, path):
    model = small_tpc(depth=6, num_heads=2).eval()
    start, P = model.tpc_cfg.start_layer, model.num_prefix_tokens
    forced = torch.ones(images.shape[0], 6, 16, dtype=torch.bool)
    forced[:, 2:4, 3] = False  # token 3 paused in blocks 2-3, restarted at block 4
    forced[:, 1:, 7] = False  # token 7 paused from block 1 on
    with torch.no_grad():
        inputs, (_, trace) = _block_inputs(model, images, forced_active=forced, path=path)
    x = {start + i: t for i, t in enumerate(inputs)}  # block index -> buffer entering it
    tok3, tok7 = P + 3, P + 7
    assert torch.equal(x[3][:, tok3], x[2][:, tok3]) and torch.equal(x[4][:, tok3], x[2][:, tok3])
    assert not torch.equal(x[5][:, tok3], x[4][:, tok3])  # restarted at 4: computed from its frozen features
    for blk in range(2, 6):
        assert torch.equal(x[blk][:, tok7], x[1][:, tok7])
    assert trace.restarted[:, 4, 3].all() and trace.restarted.sum() == images.shape[0]


def test_restarted_token_matches_recomputation_from_frozen_features(images):
    """A restarted token's next features equal running the block on its frozen features (fast path)."""
    model = small_tpc(depth=4).eval()
    forced = torch.ones(images.shape[0], 4, 16, dtype=torch.bool)
    forced[:, 1:3, 0] = False
    with torch.no_grad():
        inputs, _ = _block_inputs(model, images, forced_active=forced, path="fast")
        # inputs[k] enters block k+1; block 3 restarts token 0 with the features it had entering block 1
        assert torch.equal(inputs[2][:, 1], inputs[0][:, 1])


def test_budget_mode_runs_exactly_k_tokens_per_block(images):
    model = small_tpc().eval()
    tpcvit.set_mode(model, "budget", keep=0.25)
    lengths = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1])) for blk in model.blocks]
    with torch.no_grad():
        _, trace = model.forward_with_trace(images)
    for h in hooks:
        h.remove()
    start, P = model.tpc_cfg.start_layer, model.num_prefix_tokens
    assert lengths == [P + 16] * start + [P + 4] * (4 - start)
    assert (trace.active_counts()[:, start:] == 4).all()


def test_budget_mode_follows_the_keep_schedule_the_model_learned(images):
    model = small_tpc(depth=6).eval()
    with torch.no_grad():
        adaptive = model.forward_with_trace(images)[1].keep_ratio()[1:]  # controlled blocks 1..5
    profile = tpcvit.calibrate_keep_profile(model, images)
    assert len(profile) == 5 and abs(sum(profile) / 5 - 1.0) < 1e-3
    assert torch.allclose(torch.tensor(profile), adaptive / adaptive.mean(), atol=1e-3)
    assert current_policy(model).mode == "adaptive"  # calibration leaves the mode as it was
    tpcvit.set_mode(model, "budget", keep=0.5)  # the profile stays in the policy
    with torch.no_grad():
        counts = model.forward_with_trace(images)[1].active_counts()[:, 1:]
    expected = [max(1, min(16, round(0.5 * f * 16))) for f in profile]
    assert (counts == torch.tensor(expected)).all() and len(set(expected)) > 1
    tpcvit.set_policy(model, current_policy(model).replace(keep_profile=None))  # back to one keep for every block
    with torch.no_grad():
        assert (model.forward_with_trace(images)[1].active_counts()[:, 1:] == 8).all()
    with pytest.raises(ValueError, match="keep_profile"):
        tpcvit.ExecutionPolicy(mode="budget", keep=0.5, keep_profile=(1.0, 0.0))


def test_adaptive_level_is_a_monotone_compute_knob_with_masked_equal_to_fast(images):
    model = small_tpc(depth=6).eval()
    with torch.no_grad():
        default = model.forward_with_trace(images)[1].active
        tpcvit.set_policy(model, current_policy(model).replace(adaptive_level=0.5))  # = the model's threshold 0.5
        assert torch.equal(model.forward_with_trace(images)[1].active, default)
        kept = []
        for level in (0.1, 0.3, 0.5, 0.7, 0.9):
            model.set_budget(level)  # the harness's knob: stays adaptive, moves the level
            assert current_policy(model).mode == "adaptive" and current_policy(model).adaptive_level == level
            fast_logits, fast = model.forward_with_trace(images, path="fast")
            masked_logits, masked = model.forward_with_trace(images, path="masked")
            assert torch.equal(fast.active, masked.active)
            assert torch.allclose(fast_logits, masked_logits, atol=1e-5, rtol=1e-4)
            kept.append(fast.active[:, 1:].float().mean().item())
    assert kept == sorted(kept) and kept[0] < kept[-1], kept
    assert model.budget_bounds == (0.0, 1.0)


@pytest.mark.parametrize("mode", ["adaptive", "budget"])
@pytest.mark.parametrize("paused_keys", [False, True])
def test_decide_every_k_blocks_reuses_the_decision_and_skips_the_controller(images, mode, paused_keys):
    """ExecutionPolicy.decide_every=2: controlled blocks 1, 3, 5 decide, 2 and 4 keep the same tokens active without
    running their controller head; masked == fast; 1 is the default and changes nothing."""
    model = small_tpc(depth=6, paused_keys=paused_keys).eval()
    policy = tpcvit.ExecutionPolicy(mode=mode, keep=0.4 if mode == "budget" else None, keep_profile=(
        (1.6, 1.2, 1.0, 0.7, 0.5) if mode == "budget" else None))
    called = []
    hooks = [head.register_forward_hook(lambda m, a, o, i=i: called.append(i))
             for i, head in enumerate(model.controller)]
    with torch.no_grad():
        every, t_every = model.forward_with_trace(images, policy=policy)
        assert called == [0, 1, 2, 3, 4]
        called.clear()
        strided = policy.replace(decide_every=2)
        fast, tf = model.forward_with_trace(images, policy=strided)
        assert called == [0, 2, 4]
        masked, tm = model.forward_with_trace(images, policy=strided.replace(path="masked"))
    for h in hooks:
        h.remove()
    assert torch.equal(tf.active, tm.active) and torch.allclose(fast, masked, atol=1e-5, rtol=1e-4)
    assert torch.equal(tf.active[:, 2], tf.active[:, 1]) and torch.equal(tf.active[:, 4], tf.active[:, 3])
    assert torch.equal(tf.active[:, :2], t_every.active[:, :2])  # the first decision is the same
    assert not torch.equal(tf.active[:, 3], tf.active[:, 2])  # block 3 decides anew
    if mode == "budget":  # a block that does not decide keeps the decided block's count
        assert tf.active_counts()[:, 1:].tolist() == [[10, 10, 6, 6, 3]] * images.shape[0]
    tpcvit.set_policy(model, strided)
    assert tpcvit.vit_gmacs_from_trace(model, tf).mean().item() == pytest.approx(
        tpcvit.count_gmacs(model, images), rel=0.01)
    with pytest.raises(ValueError, match="decide_every"):
        tpcvit.ExecutionPolicy(decide_every=0)


def test_decide_every_with_the_training_free_controller_and_in_training(images):
    """The attention controller reads the class attention of the block before each decision; training repeats the
    straight-through states, so the repeated blocks' gradient reaches the deciding head."""
    model = small_tpc(depth=6, paused_keys=True, controller="attention").eval()
    policy = tpcvit.ExecutionPolicy(mode="budget", keep=0.5, decide_every=3)
    with torch.no_grad():
        fast, tf = model.forward_with_trace(images, policy=policy)
        masked, tm = model.forward_with_trace(images, policy=policy.replace(path="masked"))
    assert torch.equal(tf.active, tm.active) and torch.allclose(fast, masked, atol=1e-5, rtol=1e-4)
    assert torch.equal(tf.active[:, 3], tf.active[:, 1]) and not torch.equal(tf.active[:, 4], tf.active[:, 3])
    model = tpcvit.set_policy(small_tpc(depth=6), tpcvit.ExecutionPolicy(decide_every=2)).train()
    logits, trace = model(images, return_trace=True)
    assert trace.states.shape[1] == 5 and torch.equal(trace.states[:, 1], trace.states[:, 0])
    (logits.sum() + tpcvit.tpc_loss(trace, model.tpc_cfg, 1.0, 1.0)["total"]).backward()
    assert model.controller[0].token.weight.grad.abs().sum() > 0
    assert model.controller[1].token.weight.grad is None  # never ran


def test_adaptive_gives_the_same_result_alone_or_in_a_batch(images):
    model = small_tpc().eval()
    with torch.no_grad():
        batch_logits, batch_trace = model.forward_with_trace(images)
        counts = batch_trace.active_counts()[:, 1:]
        assert (counts != counts[0]).any(), "images should differ in their active sets"
        for i in range(images.shape[0]):
            alone, trace = model.forward_with_trace(images[i:i + 1])
            assert torch.equal(trace.active[0], batch_trace.active[i])
            assert torch.allclose(alone[0], batch_logits[i], atol=1e-5, rtol=1e-4)


def test_restart_zero_override_and_pause_only_config(images):
    model = small_tpc(depth=6).eval()
    with torch.no_grad():
        _, trace = model.forward_with_trace(images)
        with tpcvit.override_probs(model, restart=0.0):
            _, no_restart = model.forward_with_trace(images)
    assert trace.restarted.any()
    assert not no_restart.restarted.any()
    pause_only = small_tpc(depth=6, restart=False).eval()
    with torch.no_grad():
        assert not pause_only.forward_with_trace(images)[1].restarted.any()


def test_trace_fields_are_consistent(images):
    model = small_tpc().eval()
    with torch.no_grad():
        _, t = model.forward_with_trace(images)
    assert t.active.shape == t.pause_prob.shape == t.restart_prob.shape == (6, 4, 16)
    assert t.active.dtype == torch.bool
    assert torch.equal(t.paused, ~t.active)
    assert (t.restarted <= t.paused.roll(1, dims=1)).all()
    assert ((t.pause_prob >= 0) & (t.pause_prob <= 1)).all()


def test_bad_inputs_give_clear_errors(images):
    model = small_tpc().eval()
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="mode must be one of"):
        tpcvit.set_mode(model, "fast")
    with pytest.raises(ValueError, match="keep must be"):
        tpcvit.set_mode(model, "budget", keep=1.5)
    with pytest.raises(ValueError, match="start_layer"):
        timm.create_model("tpc_deit_tiny_patch16_224", **{**SMALL, "start_layer": 4})
    with pytest.raises(ValueError, match="unknown TPC option"):
        timm.create_model("tpc_deit_tiny_patch16_224", **SMALL, tpc_cfg={"keep_ratio": 0.5})
    with pytest.raises(TypeError, match="not a TPC model"):
        tpcvit.set_mode(torch.nn.Linear(2, 2), "dense")


def test_paused_keys_variant_masked_equals_fast_and_counts_kv_of_paused_tokens(images):
    model = small_tpc(paused_keys=True).eval()
    torch.manual_seed(5)
    forced = torch.rand(images.shape[0], 4, 16) > 0.5
    forced[:, : model.tpc_cfg.start_layer] = True
    with torch.no_grad():
        fast, _ = model.forward_with_trace(images, forced_active=forced, path="fast")
        masked, _ = model.forward_with_trace(images, forced_active=forced, path="masked")
        assert torch.allclose(fast, masked, atol=1e-5, rtol=1e-4)
        fast, tf = model.forward_with_trace(images)
        masked, tm = model.forward_with_trace(images, path="masked")
        alone, _ = model.forward_with_trace(images[:1])
        hidden, _ = small_tpc().eval().forward_with_trace(images, forced_active=tf.active, path="fast")
    assert torch.equal(tf.active, tm.active) and 0.1 < tf.active[:, 1:].float().mean() < 0.95
    assert torch.allclose(fast, masked, atol=1e-5, rtol=1e-4) and torch.allclose(alone, fast[:1], atol=1e-5)
    assert not torch.allclose(fast, hidden, atol=1e-3)  # visible paused keys do change the result
    counted = tpcvit.count_gmacs(model, images)
    assert tpcvit.vit_gmacs_from_trace(model, tf).mean().item() == pytest.approx(counted, rel=0.01)
    tpcvit.set_mode(model, "budget", 0.25)
    with torch.no_grad():
        _, tb = model.forward_with_trace(images)
    assert tpcvit.vit_gmacs_from_trace(model, tb).mean().item() == pytest.approx(
        tpcvit.count_gmacs(model, images), rel=0.01)


@pytest.mark.parametrize("controller", ["learned", "attention"])
def test_pooled_paused_keys_masked_equals_fast_in_every_mode_and_gmacs_count_the_work(images, controller):
    model = small_tpc(paused_keys=True, paused_key_pool=2, controller=controller).eval()
    per_token = small_tpc(paused_keys=True, controller=controller).eval()
    torch.manual_seed(5)
    forced = torch.rand(images.shape[0], 4, 16) > 0.5
    forced[:, : model.tpc_cfg.start_layer] = True
    with torch.no_grad():
        fast, _ = model.forward_with_trace(images, forced_active=forced, path="fast")  # padded selections
        masked, _ = model.forward_with_trace(images, forced_active=forced, path="masked")  # equal keys per window
        other, _ = per_token.forward_with_trace(images, forced_active=forced, path="fast")
        assert torch.allclose(fast, masked, atol=1e-5, rtol=1e-4) and not torch.allclose(fast, other, atol=1e-3)
        tpcvit.set_mode(model, "adaptive")
        fast, tf = model.forward_with_trace(images)
        masked, tm = model.forward_with_trace(images, path="masked")
        alone, _ = model.forward_with_trace(images[:1])
        assert torch.equal(tf.active, tm.active) and 0.1 < tf.active[:, 1:].float().mean() < 0.95  # restarts agree
        assert torch.allclose(fast, masked, atol=1e-5, rtol=1e-4) and torch.allclose(alone, fast[:1], atol=1e-5)
        assert tpcvit.vit_gmacs_from_trace(model, tf).mean().item() == pytest.approx(
            tpcvit.count_gmacs(model, images), rel=0.01)
        for every in (1, 2):  # budget mode: the gathered group path, one pooling per decision
            tpcvit.set_policy(model, current_policy(model).replace(mode="budget", keep=0.4, decide_every=every))
            tpcvit.set_policy(per_token, current_policy(model))
            fast, tf = model.forward_with_trace(images)
            masked, tm = model.forward_with_trace(images, path="masked")
            assert torch.equal(tf.active, tm.active) and torch.allclose(fast, masked, atol=1e-5, rtol=1e-4)
            assert torch.equal(model(images), fast)
            pooled_gmacs = tpcvit.vit_gmacs_from_trace(model, tf).mean().item()
            assert pooled_gmacs == pytest.approx(tpcvit.count_gmacs(model, images), rel=1e-3)  # the work done
            assert pooled_gmacs < tpcvit.count_gmacs(per_token, images)  # fewer keys at the same keep
    with pytest.raises(ValueError, match="needs paused_keys=True"):
        small_tpc(paused_key_pool=2)


def test_pretrained_weights_missing_offline_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tpcvit.checkpoint import CheckpointError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, offline
    with pytest.raises(CheckpointError, match=r"deit_tiny_patch16_224 \(timm/deit_tiny_patch16_224.fb_in1k\).*"
                                              "pretrained_cfg_overlay"):
        timm.create_model("tpc_deit_tiny_patch16_224", pretrained=True)


class CountCalls(TorchDispatchMode):
    """The ATen operators a block of code dispatches, by name (what bounds batch-1 latency)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("paused_keys", [False, True])
@pytest.mark.parametrize("mode", ["budget", "adaptive"])
def test_blocks_sharing_a_decision_gather_their_tokens_once(images, mode, paused_keys):
    """decide_every=5 (one decision for the 5 controlled blocks): the selection is gathered once for the group, and
    scattered back once (paused tokens masked) or after every block (paused keys: the buffer is the next block's
    keys); the result is the per-block execution's (forced decisions run block by block)."""
    model = small_tpc(depth=6, paused_keys=paused_keys, pause_bias_init=0.0).eval()
    policy = tpcvit.ExecutionPolicy(mode=mode, keep=0.4 if mode == "budget" else None, decide_every=5)
    x = images[:1] if mode == "adaptive" else images  # adaptive batches pad (or pack): those run block by block
    with torch.no_grad():
        fast, trace = model.forward_with_trace(x, policy=policy)
        assert 0 < trace.active_counts()[0, 1] < trace.active.shape[-1]  # a real selection, not every token
        with CountCalls() as count:
            model.forward_with_trace(x, policy=policy)
        forced, _ = model.forward_with_trace(x, policy=policy, forced_active=trace.active)
    assert count.calls.count("index_select") == 1
    assert count.calls.count("index_copy_") == (5 if paused_keys else 1)
    assert torch.allclose(fast, forced, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("paused_keys", [False, True])
def test_budget_keeping_every_token_skips_the_controller_when_untraced(images, paused_keys):
    """keep=1.0 in every controlled block: a plain forward runs no controller head (the decisions are all-active
    anyway) and gives the traced pass's logits; a profile that drops tokens in one block keeps the controller."""
    model = small_tpc(depth=6, paused_keys=paused_keys).eval()
    called = []
    hooks = [head.register_forward_hook(lambda m, a, o: called.append(1)) for head in model.controller]
    policy = tpcvit.ExecutionPolicy(mode="budget", keep=1.0)
    with torch.no_grad():
        traced, trace = model.forward_with_trace(images, policy=policy)
        assert len(called) == 5 and bool(trace.active.all())
        called.clear()
        tpcvit.set_policy(model, policy)
        assert torch.allclose(model(images), traced, atol=1e-5, rtol=1e-4) and called == []
        tpcvit.set_policy(model, policy.replace(keep=0.9, keep_profile=(1.2, 1.2, 1.2, 1.2, 0.5)))
        model(images)
        assert len(called) == 5
    for h in hooks:
        h.remove()


def test_deciding_once_untraced_builds_no_token_mask(images):
    """Budget-mode inference keeps the kept indices only: a plain forward deciding once (decide_every=5) builds no
    [B, N] mask (no scatter, no all-ones state), and gives the traced pass's logits, whose trace builds it."""
    from tpcvit.propagation import Decision

    model = small_tpc(depth=6, paused_keys=True, pause_bias_init=0.0).eval()
    policy = tpcvit.ExecutionPolicy(mode="budget", keep=0.4, decide_every=5)
    tpcvit.set_policy(model, policy)
    with torch.no_grad():
        traced, trace = model.forward_with_trace(images)
        with CountCalls() as count:
            plain = model(images)
    assert not [c for c in count.calls if c.startswith(("scatter", "ones", "where"))], count.calls
    assert torch.equal(plain, traced)
    kept = trace.active[:, 1]
    assert bool((kept.sum(dim=1) == round(0.4 * kept.shape[1])).all())
    # the lazy mask of an index-only decision is the mask the trace recorded
    index = kept.to(torch.uint8).topk(int(kept[0].sum()), dim=1).indices
    decision = Decision(index=index, num_patches=kept.shape[1])
    assert torch.equal(decision.active, kept) and decision.states.dtype == torch.float32
    assert torch.equal(decision.states, kept.float())
