"""Host synchronisations: budget mode (TPC and every peer at a fixed budget) never makes the host wait for the device,
so it can be captured in a CUDA graph and never stalls a GPU's queue; adaptive mode reads its token count on the host
once per decision (a shape depends on it), not once per block or per check. Counted on CPU by
:func:`tpcvit.bench.host_syncs`, which sees the ops that would wait on a GPU."""

import pytest
import timm
import torch
from conftest import SMALL, small_tpc

import tpcvit
from tpcvit.bench import host_syncs
from tpcvit.compare import build_variant, parse_spec
from tpcvit.config import load_config
from tpcvit.runtime import current_policy, set_policy

TINY = "model.kwargs={img_size: 32, patch_size: 8, depth: 4, embed_dim: 64, num_heads: 2}"


def test_host_syncs_counts_what_waits_on_the_device_and_nothing_else():
    t = torch.arange(6.0)
    found = host_syncs(lambda: (t[t > 2], t.tolist(), t.sum().item(), bool(t.any()), t.nonzero(),
                                t.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]))))
    assert found == {"aten::index (boolean mask)": 1, "Tensor.tolist": 1, "aten::_local_scalar_dense": 2,
                     "aten::nonzero": 1, "aten::repeat_interleave": 1}  # .item() and bool(): a scalar read each
    with torch.inference_mode():  # where the benchmark asks (there .item() would skip the dispatcher)
        assert host_syncs(lambda: (t.sum().item(), bool(t.any()))) == {"aten::_local_scalar_dense": 2}
    rows = torch.tensor([1, 3])
    assert host_syncs(lambda: (t.index_select(0, rows), t.topk(2), t.sort(), t.repeat_interleave(2), t[1:4],
                               torch.nonzero_static(t > 2, size=3))) == {}


@pytest.mark.parametrize("spec", ["dense", "dense-lean", "tpc=0.5", "tpc=0.5/2", "tpc-keys=0.5", "tpc-free=0.5",
                                  "tpc-free=0.5/3", "tome=4", "evit=0.7", "idlevit=0.5", "dynamicvit=0.7"])
@pytest.mark.parametrize("batch", [1, 3])
def test_budget_mode_and_every_fixed_budget_peer_never_sync(spec, batch):
    """No host sync, and no host tensor made mid-forward: the GPU paths checked without a GPU. On the meta device
    (shapes, no data) a forward fails where it mixes a tensor made on the host (an index, a mask, a table built
    without ``device=``) into arithmetic on the model's device, which on a GPU is an error or a copy per call.
    (Indexing with a host index passes on meta; the CUDA tier of ``scripts/gpu_check.sh`` covers it.)"""
    cfg = load_config(None, ["model.name=deit_small_patch16_224", TINY])
    parsed = parse_spec(spec)
    model = build_variant(cfg, parsed, 10, {}).eval()
    if parsed.knob is not None:
        model.set_budget(parsed.knob)
    if parsed.every > 1:
        set_policy(model, current_policy(model).replace(decide_every=parsed.every))
    x = torch.randn(batch, 3, 32, 32)
    assert host_syncs(lambda: model(x)) == {}
    with torch.no_grad():  # after a CPU run: caches made there must not leak host tensors into the meta run
        out = model.to("meta")(x.to("meta"))
    assert out.device.type == "meta" and out.shape == (batch, 10)


@pytest.mark.parametrize("name,kwargs", [
    ("tpc_lvvit_s", dict(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2)),
    ("tpc_swin_tiny_patch4_window7_224", dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2),
                                              num_heads=(2, 4))),
    ("tpc_deit_small_patch16_224", dict(SMALL, paused_keys=True, paused_key_pool=2)),
])
def test_budget_mode_of_every_family_never_syncs(name, kwargs):
    model = tpcvit.set_policy(timm.create_model(name, **kwargs, pause_bias_init=0.0).eval(),
                              tpcvit.ExecutionPolicy(mode="budget", keep=0.5))
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    assert host_syncs(lambda: model(x)) == {}
    with torch.no_grad():  # and no host tensor mixed in (see the test above)
        assert model.to("meta")(x.to("meta")).device.type == "meta"


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("batch", [1, 6])
def test_adaptive_mode_syncs_once_per_decision(images, packed, every, batch):
    """4 blocks from start layer 1: 3 controlled blocks, so 3 decisions (every block) or 2 (every 2nd)."""
    model = small_tpc().eval()
    policy = tpcvit.ExecutionPolicy(mode="adaptive", packed=packed, decide_every=every)
    x = images[:batch]
    with torch.no_grad():
        _, trace = model.forward_with_trace(x, policy=policy)
    assert 0 < trace.active[:, 1:].float().mean() < 1  # tokens really paused: the selections are not trivial
    found = host_syncs(lambda: model.forward_head(model._propagate(x, policy, with_trace=False)[0]))
    assert sum(found.values()) == (3 if every == 1 else 2), found


@pytest.mark.parametrize("packed", [True, False])
def test_an_adaptive_batch_selects_once_for_blocks_sharing_a_decision(images, packed):
    """Padded and packed adaptive selections are made once for the blocks deciding together (decide_every=5), and
    give the block-by-block execution's result."""
    model = small_tpc(depth=6).eval()
    policy = tpcvit.ExecutionPolicy(mode="adaptive", packed=packed, decide_every=5)
    with torch.no_grad():
        fast, trace = model.forward_with_trace(images, policy=policy)
        counts = trace.active_counts()[:, 1]
        assert counts.min() < counts.max()  # images differ: a padded (or packed) selection
        forced, _ = model.forward_with_trace(images, policy=policy, forced_active=trace.active)
        masked, _ = model.forward_with_trace(images, policy=policy.replace(path="masked"))
    assert sum(host_syncs(lambda: model._propagate(images, policy, with_trace=False)).values()) == 1
    torch.testing.assert_close(fast, forced, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast, masked, atol=1e-5, rtol=1e-4)


def test_adaptive_swin_syncs_at_most_once_per_controlled_block():
    model = timm.create_model("tpc_swin_tiny_patch4_window7_224", img_size=64, patch_size=4, window_size=4,
                              embed_dim=32, depths=(2, 2), num_heads=(2, 4), pause_bias_init=0.0).eval()
    x = torch.randn(3, 3, 64, 64)
    controlled = 4 - model.tpc_cfg.start_layer
    found = host_syncs(lambda: model._propagate(x, tpcvit.ExecutionPolicy(mode="adaptive"), with_trace=False))
    assert 0 < sum(found.values()) <= controlled, found


def test_graph_variants_captures_the_sync_free_passes_and_leaves_the_rest_eager(monkeypatch, images):
    """The routing of ``--cuda-graphs`` (capture itself needs a GPU: tests/test_cuda.py): a pass with host syncs is
    never captured and says why; a failed capture falls back to eager with the error."""
    from tpcvit import bench

    captured = []

    def capture(fn, device):
        if fn is failing:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        captured.append(fn)
        return fn

    monkeypatch.setattr(bench, "cuda_graphed", capture)
    budget = tpcvit.set_policy(small_tpc().eval(), tpcvit.ExecutionPolicy(mode="budget", keep=0.5))
    adaptive = tpcvit.set_policy(small_tpc().eval(), tpcvit.ExecutionPolicy(mode="adaptive"))

    def budget_pass():
        return budget(images)

    def failing():
        return budget(images)

    with torch.no_grad():
        fns, eager = bench.graph_variants({"tpc@50%": budget_pass, "tpc adaptive": lambda: adaptive(images),
                                           "odd op": failing}, torch.device("cpu"))
    assert captured == [budget_pass] and set(fns) == {"tpc@50%", "tpc adaptive", "odd op"}
    assert eager == {"tpc adaptive": "host syncs: Tensor.tolist x3",
                     "odd op": "capture failed: operation not permitted when stream is capturing"}


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_patch16_rope_mixed_224"])
@pytest.mark.parametrize("batch", [1, 3])
def test_training_free_tpc_on_rope_models_never_syncs(name, batch):
    """The Eva adapter's budget mode (rotary rows gathered with each selection, paused keys at their own
    positions; depth-dependent tables) is sync-free and makes no host tensor mid-forward, as the ViT's."""
    cfg = load_config(None, [f"model.name={name}", "model.kwargs={img_size: 32, patch_size: 8, embed_dim: 64, "
                             "depth: 4, num_heads: 2, dynamic_img_size: false}"])
    model = build_variant(cfg, parse_spec("tpc-free=0.5"), 10, {}).eval()
    model.set_budget(0.5)
    x = torch.randn(batch, 3, 32, 32)
    assert host_syncs(lambda: model(x)) == {}
    with torch.no_grad():
        assert model.to("meta")(x.to("meta")).device.type == "meta"
