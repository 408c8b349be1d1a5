"""The CUDA tier (scripts/gpu_check.sh runs it on a GPU; without one these tests are skipped, nothing else is)."""

import os

import pytest
import timm
import torch
from conftest import small_tpc

import tpcvit
from tpcvit import set_mode

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def cuda_images():
    torch.manual_seed(1)
    return torch.randn(6, 3, 32, 32, device="cuda")


@pytest.mark.parametrize("paused_keys", [False, True])
def test_masked_equals_fast_on_cuda_and_matches_cpu(paused_keys, cuda_images):
    model = small_tpc(paused_keys=paused_keys).eval()
    with torch.no_grad():
        cpu, t_cpu = model.forward_with_trace(cuda_images.cpu(), path="fast")
        model.cuda()
        fast, t_fast = model.forward_with_trace(cuda_images, path="fast")
        masked, t_masked = model.forward_with_trace(cuda_images, path="masked", forced_active=t_fast.active)
    assert torch.equal(t_fast.active.cpu(), t_cpu.active)
    torch.testing.assert_close(fast, masked, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fast.cpu(), cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mode", ["adaptive", "budget"])
def test_modes_and_bf16_autocast_on_cuda(mode, cuda_images):
    model = set_mode(small_tpc().cuda().eval(), mode, 0.5 if mode == "budget" else None)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits, trace = model.forward_with_trace(cuda_images)
    assert torch.isfinite(logits.float()).all() and trace.active.is_cuda
    if mode == "budget":
        assert (trace.active[:, model.tpc_cfg.start_layer:].sum(-1) == 8).all()  # 16 tokens, keep 0.5


def test_patched_timm_vit_and_peers_on_cuda(cuda_images):
    for name in ("deit_small_patch16_224", "idlevit_deit_small_patch16_224", "dynamicvit_deit_small_patch16_224"):
        model = timm.create_model(name, img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2).cuda().eval()
        if not name.startswith(("idlevit", "dynamicvit")):
            tpcvit.patch(model, keep=0.5)
        with torch.no_grad():
            assert torch.isfinite(model(cuda_images)).all()


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_patch16_rope_mixed_224"])
@pytest.mark.parametrize("pool", [1, 2])
def test_patched_rope_models_on_cuda_match_cpu(name, pool, cuda_images):
    """The Eva adapter on a GPU: rotary rows gathered (and, pool 2, pooled per window) on the device, the same
    selection and logits as on CPU."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2,
                              dynamic_img_size=False).eval()
    tpcvit.patch(model, keep=0.5, paused_key_pool=pool)
    with torch.no_grad():
        cpu, t_cpu = model.forward_with_trace(cuda_images.cpu())
        fast, t_fast = model.cuda().forward_with_trace(cuda_images)
    assert torch.equal(t_fast.active.cpu(), t_cpu.active)
    torch.testing.assert_close(fast.cpu(), cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("paused_keys", [False, True])
def test_budget_mode_replays_from_a_cuda_graph(paused_keys, cuda_images):
    """Budget mode has no host sync (tests/test_host_syncs.py): captured once, a replay on new images in the same
    input memory gives the eager forward's logits; adaptive mode (it reads its token count) is left eager."""
    from tpcvit.bench import cuda_graphed, graph_variants

    model = tpcvit.set_policy(small_tpc(paused_keys=paused_keys).cuda().eval(),
                              tpcvit.ExecutionPolicy(mode="budget", keep=0.5, decide_every=2))
    static = cuda_images.clone()
    out = {}

    def forward():
        out["logits"] = model(static)

    with torch.inference_mode():
        replay = cuda_graphed(forward, static.device)
        static.copy_(cuda_images.flip(0))
        replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out["logits"], model(cuda_images.flip(0)), rtol=1e-3, atol=1e-4)
        adaptive = tpcvit.set_policy(small_tpc().cuda().eval(), tpcvit.ExecutionPolicy(mode="adaptive"))
        fns, eager = graph_variants({"budget": forward, "adaptive": lambda: adaptive(static)}, static.device)
    assert set(eager) == {"adaptive"} and eager["adaptive"].startswith("host syncs")
    assert fns["budget"] is not forward


def test_bench_with_cuda_graphs_times_replays(tmp_path):
    from tpcvit.bench import bench_tpc_speed

    rows, meta = bench_tpc_speed("tpc_deit_tiny_patch16_224", (1.0, 0.5), (1, 8), rounds=2, device="cuda",
                                 cuda_graphs=True, decide_every=(1, 3), img_size=64)
    assert meta["cuda_graphs"] and {r.variant for r in rows} >= {"dense", "dense-lean", "tpc@50%", "tpc@50%/3"}
    assert all(r.eager_reason is None and r.img_per_s > 0 for r in rows)  # every budget variant captured


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP with NCCL needs 2 GPUs")
def test_ddp_init_with_nccl(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    torchrun = str(Path(sys.executable).parent / "torchrun")
    code = ("import tpcvit, torch, torch.distributed as dist; from tpcvit.engine import init_distributed; "
            "i = init_distributed(); t = torch.ones(1, device=i.device); dist.all_reduce(t); "
            "assert dist.get_backend() == 'nccl' and t.item() == 2; print('ok')")
    script = tmp_path / "ddp.py"
    script.write_text(code)
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script)], capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_small_patch16_dinov3"])
def test_any_image_size_and_feature_maps_on_cuda_match_cpu(name):
    """A model taking any image size (dynamic_img_size=True), patched at 32 px and run at 24 x 40 on the GPU: the
    same decisions, logits and forward_intermediates maps as on CPU."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2,
                              dynamic_img_size=True).eval()
    tpcvit.patch(model, keep=0.5)
    images = torch.randn(3, 3, 24, 40)
    with torch.no_grad():
        cpu, t_cpu = model.forward_with_trace(images)
        cpu_maps = model.forward_intermediates(images, indices=2, intermediates_only=True)
        model.cuda()
        gpu, t_gpu = model.forward_with_trace(images.cuda())
        gpu_maps = model.forward_intermediates(images.cuda(), indices=2, intermediates_only=True)
    assert t_gpu.grid == (3, 5) and torch.equal(t_gpu.active.cpu(), t_cpu.active)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)
    for a, b in zip(gpu_maps, cpu_maps):
        assert a.shape == (3, 64, 3, 5)
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-4)
