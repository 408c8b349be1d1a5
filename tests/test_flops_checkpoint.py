"""FLOP counting (work actually done), checkpoints (local files, atomic, clear errors), import guard."""

import subprocess
import sys

import pytest
import timm
import torch
from conftest import SMALL, small_tpc

import tpcvit
from tpcvit.checkpoint import CheckpointError, atomic_write


def test_dense_deit_small_is_4_60_gmacs_with_cpu_fused_attention():
    model = timm.create_model("deit_small_patch16_224").eval()
    gmacs = tpcvit.count_gmacs(model, torch.randn(1, 3, 224, 224))
    assert abs(gmacs - 4.60) < 0.01, gmacs
    tpc = timm.create_model("tpc_deit_small_patch16_224")
    tpcvit.set_mode(tpc, "dense")
    assert abs(tpcvit.count_gmacs(tpc, torch.randn(1, 3, 224, 224)) - 4.60) < 0.01


@pytest.mark.parametrize("decide_every", [1, 2])
def test_adaptive_gmacs_count_only_the_work_done_per_image(images, decide_every):
    model = small_tpc().eval()  # decide_every 2: the controller heads run in every 2nd controlled block only
    tpcvit.set_policy(model, model.tpc_policy.replace(decide_every=decide_every))
    with torch.no_grad():
        _, trace = model.forward_with_trace(images)
    per_image = tpcvit.vit_gmacs_from_trace(model, trace)
    assert per_image.std() > 0  # images differ
    measured = tpcvit.count_gmacs(model, images)
    assert abs(measured - per_image.mean().item()) / measured < 1e-3
    tpcvit.set_mode(model, "dense")
    dense = tpcvit.count_gmacs(model, images)
    assert measured < dense


def test_budget_gmacs_follow_keep(images):
    model = small_tpc().eval()
    costs = []
    for keep in (1.0, 0.5, 0.25):
        tpcvit.set_mode(model, "budget", keep=keep)
        with torch.no_grad():
            _, trace = model.forward_with_trace(images)
        measured = tpcvit.count_gmacs(model, images)
        assert abs(measured - tpcvit.vit_gmacs_from_trace(model, trace).mean().item()) / measured < 1e-3
        costs.append(measured)
    assert costs[0] > costs[1] > costs[2]


def test_checkpoint_round_trip_and_errors(tmp_path, images):
    model = small_tpc().eval()
    path = tpcvit.save_weights(model, tmp_path / "tpc.safetensors")
    twin = small_tpc(seed=9).eval()
    tpcvit.load_backbone(twin, path)  # full TPC checkpoint: controller weights load too
    with torch.no_grad():
        assert torch.equal(model(images), twin(images))
    torch.save({"model": model.state_dict()}, tmp_path / "nested.pth")
    tpcvit.load_backbone(small_tpc(seed=2), tmp_path / "nested.pth")

    with pytest.raises(CheckpointError, match="create the model with num_classes"):
        tpcvit.load_backbone(small_tpc(num_classes=3), path)
    with pytest.raises(CheckpointError, match="another architecture"):
        tpcvit.load_backbone(small_tpc(depth=2), path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        tpcvit.load_backbone(model, tmp_path / "nope.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        tpcvit.load_backbone(model, broken)


def test_dense_checkpoint_at_another_resolution_resamples_pos_embed(tmp_path):
    dense = timm.create_model("deit_tiny_patch16_224", **{**SMALL, "img_size": 64})
    tpcvit.save_weights(dense, tmp_path / "d.safetensors")
    tpc = timm.create_model("tpc_deit_tiny_patch16_224", **SMALL)
    tpcvit.load_backbone(tpc, tmp_path / "d.safetensors")
    assert tpc.pos_embed.shape[1] == 17


def test_dense_checkpoint_with_another_patch_size_starts_a_model_with_more_tokens(tmp_path):
    """A 4x4-patch backbone loads into a 2x2-patch model of the same width (4x the tokens): the patch embedding is
    resampled so the new model on an image sees what the old one saw on the image upsampled 2x, and the position
    embedding is resampled to the finer grid."""
    import torch.nn.functional as F
    from timm.layers import resample_patch_embed

    torch.manual_seed(0)
    kw = dict(img_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=3, in_chans=1)
    coarse = timm.create_model("deit_tiny_patch16_224", patch_size=4, **kw)
    tpcvit.save_weights(coarse, tmp_path / "coarse.safetensors")
    fine = timm.create_model("tpc_deit_tiny_patch16_224", patch_size=2, **kw)
    tpcvit.load_backbone(fine, tmp_path / "coarse.safetensors")
    assert fine.pos_embed.shape[1] == 1 + 64
    assert torch.equal(fine.patch_embed.proj.weight, resample_patch_embed(coarse.patch_embed.proj.weight, [2, 2]))
    image = torch.randn(1, 1, 16, 16)
    big = F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
    grid = (coarse.patch_embed.proj(big) - coarse.patch_embed.proj.bias[:, None, None]).flatten(2)
    mine = (fine.patch_embed.proj(image) - fine.patch_embed.proj.bias[:, None, None]).flatten(2)
    # not exact (the pseudo-inverse matches the bilinear upsampling only approximately): well correlated
    corr = torch.corrcoef(torch.stack([grid.flatten(), mine.flatten()]))[0, 1]
    assert corr > 0.85, corr
    assert torch.equal(fine.blocks[0].attn.qkv.weight, coarse.blocks[0].attn.qkv.weight)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "w.bin"
    target.write_text("old")

    def failing(tmp):
        open(tmp, "w").write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]


@pytest.mark.slow  # subprocess / ONNX / hub cache: the pipeline tier
def test_import_guard_makes_timm_importable_in_a_fresh_process():
    code = ("import tpcvit, timm, torchvision; from tpcvit import _compat; "
            "m = timm.create_model('tpc_deit_tiny_patch16_224', img_size=32, patch_size=8, depth=2); "
            "print('ok', _compat.guard_applied)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


def test_steady_allocator_is_applied_for_cpu_timing_and_reported(monkeypatch):
    """Timing fixes glibc's mmap/trim thresholds (page-fault noise) and says so; TPCVIT_STEADY_MALLOC=0 opts out."""
    import tpcvit.bench as bench

    monkeypatch.setattr(bench, "_allocator_note", "default")
    monkeypatch.setenv("TPCVIT_STEADY_MALLOC", "0")
    bench.time_interleaved({"noop": lambda: None}, torch.device("cpu"), rounds=1, progress=False)
    assert bench.machine_info()["allocator"] == "default"
    monkeypatch.delenv("TPCVIT_STEADY_MALLOC")
    samples = bench.time_interleaved({"noop": lambda: None}, torch.device("cpu"), rounds=2, progress=False)
    assert len(samples["noop"]) == 2
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert bench.machine_info()["allocator"].startswith("glibc mallopt")


def test_bench_breakdown_times_every_part_of_a_controlled_block():
    """The parts exist and are positive; the report renders (numbers only: no timing assertion)."""
    from tpcvit.breakdown import breakdown, breakdown_markdown

    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=3)
    result = breakdown("tpc_deit_tiny_patch16_224", [1.0, 0.5], [1, 4], rounds=2, decide_every=(1, 2), **kw)
    for batch in ("1", "4"):
        r = result["batches"][batch]
        ops = r["aten_ops"]
        assert set(r["model_ms"]) == {"dense", "dense (lean)", "tpc@100%", "tpc@100% without stabilizers",
                                      "tpc@50%", "tpc@50%/2", "cut once@50%"}
        # keep 100%, paired per round (2 rounds: no interval), with and without the stabilizers
        assert set(r["keep_100"]) == {"overhead", "without_stabilizers"}
        assert r["keep_100"]["overhead"][0] > -1 and r["keep_100"]["overhead"][1:] == [None, None]
        assert ops["tpc@100% without stabilizers"] < ops["tpc@100%"]
        assert min(r["model_ms"].values()) > 0 and set(r["ceiling_fraction"]) == {"0.5", "0.5/2"}
        assert ops["tpc@50%"] > ops["tpc@50%/2"] > ops["dense"] > 20  # decisions add calls; reusing one, fewer
        assert ops["dense (lean)"] < ops["dense"]  # the lean executor: the same blocks with fewer calls
        # keep 100%: no controller runs (every token is kept anyway); leaner blocks than timm's, plus the stabilizer
        assert ops["tpc@100%"] < ops["tpc@50%/2"]
        syncs = r["host_syncs"]  # budget mode never waits on the device; adaptive reads its count per decision
        assert all(v == 0 for k, v in syncs.items() if k != "tpc adaptive (not timed)")
        assert syncs["tpc adaptive (not timed)"] == 2 and set(r["model_ms"]) < set(syncs)
        parts = r["block_us"]["0.5"]
        assert {"controller head", "decision (probabilities, smoothing, top-k)", "selection + gather/scatter",
                "block on its selection (incl. gather/scatter)", "block on every token (dense)"} == set(parts)
        assert min(parts.values()) > 0
    assert "vs dense (lean)" in breakdown_markdown(result) and result["controlled_blocks"] == 2
    assert "zero-overhead ceiling" in breakdown_markdown(result)
    assert "TPC budget mode 0, adaptive mode 2" in breakdown_markdown(result)
    assert "without its stabilizers" in breakdown_markdown(result)


def test_breakdown_ceiling_runs_the_same_tokens_as_tpc_budget_mode():
    """The ceiling (dense model cut once) computes what TPC computes when it keeps the first k patch tokens in every
    controlled block with paused tokens masked out: same class-token output, so its speed is a fair bound."""
    from tpcvit.breakdown import cut_forward

    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3)
    dense = timm.create_model("deit_tiny_patch16_224", **kw).eval()
    images = torch.randn(2, 3, 32, 32)
    forced = torch.zeros(2, 4, 16, dtype=torch.bool)
    forced[:, :1] = True
    forced[:, 1:, :6] = True
    for paused_keys in (False, True):
        tpc = timm.create_model("tpc_deit_tiny_patch16_224", start_layer=1, paused_keys=paused_keys, **kw).eval()
        tpc.load_state_dict(dense.state_dict(), strict=False)
        with torch.no_grad():
            expected, _ = tpc.forward_with_trace(images, forced_active=forced, path="fast")
            cut = cut_forward(dense, images, 1, 6 / 16, paused_keys)
            assert torch.allclose(cut, expected, atol=1e-5), paused_keys
            other = cut_forward(dense, images, 1, 6 / 16, not paused_keys)
            assert not torch.allclose(other, expected, atol=1e-3)  # the two ceilings differ: the test can tell
    assert torch.equal(cut_forward(dense, images, 1, 1.0), dense(images))
