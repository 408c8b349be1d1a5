"""ONNX export: budget-mode TPC (static shapes) runs in onnxruntime and reproduces PyTorch; bad requests fail
clearly and leave no file."""

import numpy as np
import pytest
import timm
import torch
from conftest import small_tpc
from test_families import LVVIT_SMALL, SWIN_SMALL

import tpcvit
from tpcvit import set_mode
from tpcvit.cli import main
from tpcvit.export import ExportError, check_onnx, export_onnx, ort_session


def _ort_logits(path, x):
    return torch.from_numpy(ort_session(path).run(None, {"images": x.numpy()})[0])


@pytest.mark.parametrize("paused_keys", [False, True])
def test_budget_export_matches_pytorch_at_any_batch(tmp_path, paused_keys):
    model = small_tpc(paused_keys=paused_keys).eval()
    report = export_onnx(model, tmp_path / "m.onnx", mode="budget", keep=0.5)
    assert report.checked_batches == [1, 3] and report.max_abs_diff < 1e-4
    # a batch the export never saw, and the same images give the same decisions as in PyTorch
    x = torch.randn(5, 3, 32, 32)
    set_mode(model, "budget", keep=0.5)
    with torch.no_grad():
        ref, trace = model.forward_with_trace(x)
    assert trace.active[:, 1:].float().mean().item() == pytest.approx(0.5)
    torch.testing.assert_close(_ort_logits(tmp_path / "m.onnx", x), ref, rtol=1e-4, atol=1e-4)


def test_exported_keep_really_drops_work(tmp_path):
    """Keeping 25% must change the logits relative to dense (the graph is not silently the dense one)."""
    model = small_tpc().eval()
    export_onnx(model, tmp_path / "b.onnx", mode="budget", keep=0.25)
    export_onnx(model, tmp_path / "d.onnx", mode="dense")
    x = torch.randn(2, 3, 32, 32)
    budget, dense = _ort_logits(tmp_path / "b.onnx", x), _ort_logits(tmp_path / "d.onnx", x)
    assert not torch.allclose(budget, dense, atol=1e-3)
    set_mode(model, "dense")
    with torch.no_grad():
        torch.testing.assert_close(dense, model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,kwargs", [("tpc_lvvit_s", LVVIT_SMALL),
                                         ("tpc_swin_tiny_patch4_window7_224", SWIN_SMALL)])
def test_other_families_export_in_budget_mode(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs, pause_bias_init=0.0, restart_bias_init=0.0)
    report = export_onnx(model, tmp_path / "m.onnx", mode="budget", keep=0.5)
    assert report.max_abs_diff < 1e-4 and report.input_shape == [1, 3, 64, 64]


def test_check_catches_a_graph_that_differs(tmp_path):
    model = small_tpc().eval()
    export_onnx(model, tmp_path / "m.onnx", mode="budget", keep=0.5, check=False)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_onnx(model, tmp_path / "m.onnx", [2])


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    import tpcvit.export as ex

    def broken(*args, **kwargs):
        raise ExportError("exported model differs from PyTorch by 1 (test)")

    monkeypatch.setattr(ex, "check_onnx", broken)
    with pytest.raises(ExportError):
        export_onnx(small_tpc(), tmp_path / "m.onnx", mode="budget", keep=0.5)
    assert list(tmp_path.iterdir()) == []


def test_adaptive_mode_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="mode='budget'"):
        export_onnx(small_tpc(), tmp_path / "m.onnx", mode="adaptive")
    dense = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    with pytest.raises(ValueError, match="not a TPC model"):
        export_onnx(dense, tmp_path / "m.onnx", mode="budget", keep=0.5)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_exports_a_checkpoint_with_its_class_count(tmp_path, capsys):
    model = small_tpc(num_classes=7)
    tpcvit.save_weights(model, tmp_path / "w.safetensors")
    kwargs = "model.kwargs={img_size: 32, patch_size: 8, embed_dim: 64, depth: 4, num_heads: 2}"
    out = tmp_path / "m.onnx"
    rc = main(["export", "--model", "tpc_deit_small_patch16_224", "--checkpoint", str(tmp_path / "w.safetensors"),
               "--keep", "0.5", "--out", str(out), "--bench", "2", "--rounds", "1", kwargs])
    assert rc == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "onnxruntime matches PyTorch" in printed and "| 2 |" in printed
    logits = ort_session(out).run(None, {"images": np.zeros((1, 3, 32, 32), np.float32)})[0]
    assert logits.shape == (1, 7)
    rc = main(["export", "--model", "tpc_deit_small_patch16_224", "--checkpoint", str(tmp_path / "nope.safetensors"),
               "--out", str(tmp_path / "x.onnx"), kwargs])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_torch_compile_of_budget_mode_matches_eager_and_benches():
    """Budget mode has static shapes: torch.compile(fullgraph=True) traces it without graph breaks."""
    from tpcvit.bench import bench_tpc_speed
    from tpcvit.layers import TokenGridStabilizer

    model = small_tpc(depth=2).eval()
    for stab in model.modules():  # non-zero weights: the compiled stabilizer must compute the same function
        if isinstance(stab, TokenGridStabilizer):
            torch.nn.init.normal_(stab.conv.weight, std=0.2)
    set_mode(model, "budget", keep=0.5)
    x = torch.randn(3, 3, 32, 32)
    shifted = []
    original = TokenGridStabilizer._shifted_local
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(TokenGridStabilizer, "_shifted_local", lambda *a: shifted.append(1) or original(*a))
        compiled = torch.compile(model, fullgraph=True, dynamic=False)(x)
        assert shifted  # compiled graphs take the fusible execution (traced once), eager never does
        shifted.clear()
        torch.testing.assert_close(compiled, model(x), rtol=1e-4, atol=1e-4)
        assert not shifted
    rows, meta = bench_tpc_speed("tpc_deit_tiny_patch16_224", keeps=(0.5,), batch_sizes=(2,), rounds=2,
                                 compile=True, img_size=32, patch_size=8, depth=2)
    assert meta["compiled"] and [r.variant for r in rows] == ["dense", "dense-lean", "tpc@50%"]
    assert all(r.img_per_s > 0 for r in rows) and rows[2].gmacs < rows[0].gmacs == rows[1].gmacs


def test_methods_harness_times_every_model_compiled():
    """``tpcvit bench --methods ... --compile``: TPC (deciding once), a peer and dense all run through
    torch.compile (graphs really compiled), at matched GMACs, with the paired TPC-over-peer rows."""
    from torch._dynamo.utils import counters

    from tpcvit.compare import compare_markdown, run_compare
    from tpcvit.config import load_config

    cfg = load_config("configs/fmnist_main.yaml", ["model.kwargs={img_size: 28, patch_size: 7, in_chans: 1, "
                                                   "embed_dim: 32, depth: 3, num_heads: 2}", "model.tpc.start_layer=1"])
    counters.clear()
    result = run_compare(cfg, ["dense", "dense-lean", "tpc@0.6/2", "evit@0.6"], {}, [2], rounds=2, calib_images=8,
                         with_data=False, progress=False, compile=True)
    assert result["compiled"] and counters["stats"]["unique_graphs"] >= 4
    assert [r["variant"] for r in result["speed"]] == ["dense", "dense-lean", "tpc@60%/2", "evit@60%"]
    assert result["points"]["dense-lean"]["gmacs_ratio"] == pytest.approx(1.0)
    assert all(r["img_per_s"] > 0 for r in result["speed"])
    assert "| 2 | tpc@60%/2 | evit@60% |" in compare_markdown(result)
    assert "| 2 | tpc@60%/2 | dense-lean |" in compare_markdown(result)
