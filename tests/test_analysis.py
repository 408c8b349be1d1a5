"""Restart analysis and token maps: numbers consistent with the trace, valid PNGs for a real image."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_tpc
from PIL import Image

from tpcvit.analysis import analyze, restart_matrix, trace_statistics, write_analysis
from tpcvit.data import FASHION_MNIST_DIR, read_idx


def test_restart_matrix_counts_pauses_by_start_and_end():
    a = torch.ones(1, 5, 3, dtype=torch.bool)
    a[0, 1:3, 0] = False  # token 0: paused at 1, restarted at 3
    a[0, 2:, 1] = False  # token 1: paused at 2, never restarted
    a[0, 1, 2] = False  # token 2: paused at 1, restarted at 2, paused again at 4
    a[0, 4, 2] = False
    m = restart_matrix(a)
    assert m[1, 3] == 1 and m[2, 5] == 1 and m[1, 2] == 1 and m[4, 5] == 1
    assert m.sum() == 4


def test_trace_statistics_are_consistent_with_the_trace(images):
    model = small_tpc(depth=6).eval()
    with torch.no_grad():
        _, trace = model.forward_with_trace(images)
    s = trace_statistics(trace)
    total = np.asarray(s["active_not_restarted"]) + np.asarray(s["restarted"]) + np.asarray(s["paused"])
    assert np.allclose(total, 1.0)
    assert sum(s["pauses_restarted"]) == int(trace.restarted.sum()) > 0
    assert all(r <= p for r, p in zip(s["pauses_restarted"], s["pauses_started"]))
    # restarted tokens at block l were paused at l-1
    prev_paused = np.concatenate([[0.0], np.asarray(s["paused"])[:-1]])
    assert (np.asarray(s["restarted"]) <= prev_paused + 1e-9).all()


def test_analyze_reports_the_value_of_restarts_and_writes_outputs(images, tmp_path):
    model = small_tpc(depth=6).eval()
    loader = [(images, torch.arange(6) % 5)]
    result = analyze(model, loader, torch.device("cpu"), progress=False)
    assert result["images"] == 6 and 0 < result["restart_rate"] <= 1
    with torch.no_grad():
        from tpcvit import override_probs

        with override_probs(model, restart=0.0):
            nr = model(images).argmax(-1)
    assert result["top1_no_restart"] == pytest.approx(100 * (nr == torch.arange(6) % 5).float().mean().item())
    no_restart = analyze(small_tpc(depth=6, restart=False).eval(), loader, torch.device("cpu"), progress=False)
    assert no_restart["restart_rate"] == 0 and sum(no_restart["shares"]["restarted"]) == 0
    files = write_analysis(result, tmp_path)
    assert json.loads(files[0].read_text())["depth"] == 6
    assert Image.open(files[1]).format == "PNG"


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="needs dataset-fashion-mnist (.ci/run installs it)")
def test_viz_writes_a_png_grid_for_a_real_image(tmp_path):
    real = read_idx(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz")[0]
    Image.fromarray(real).save(tmp_path / "boot.png")
    model = small_tpc(depth=6, img_size=28, patch_size=4, in_chans=1)
    import tpcvit

    tpcvit.save_weights(model, tmp_path / "m.safetensors")
    kwargs = "model.kwargs={img_size: 28, patch_size: 4, in_chans: 1, embed_dim: 64, depth: 6, num_heads: 2}"
    out = subprocess.run([sys.executable, "-m", "tpcvit", "viz", "--checkpoint", str(tmp_path / "m.safetensors"),
                          "--images", str(tmp_path / "boot.png"), "--num-classes", "5", "-o", str(tmp_path / "viz"),
                          "model.name=tpc_deit_small_patch16_224", kwargs, "data.mean=[0.286]", "data.std=[0.353]",
                          "model.tpc={pause_bias_init: 0.0, restart_bias_init: 0.0}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    png = Image.open(tmp_path / "viz" / "boot_tokens.png")
    assert png.format == "PNG" and png.size == (int(2.1 * 7 * 110), int((2.3 * 1 + 0.4) * 110))
