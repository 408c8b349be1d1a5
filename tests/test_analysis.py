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


@pytest.mark.slow  # subprocess / ONNX / hub cache: the pipeline tier
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
    expected = (2.1 * 7 * 110, (2.3 * 1 + 0.4) * 110)  # figure inches x dpi; matplotlib may truncate or round
    assert png.format == "PNG" and all(abs(got - want) <= 1 for got, want in zip(png.size, expected))


def test_decision_noise_measures_salt_and_pepper_and_flips():
    from tpcvit.analysis import decision_noise
    from tpcvit.propagation import TokenTrace

    def trace_of(active):
        z = torch.zeros(active.shape)
        return TokenTrace(active, z, z, z, z, z, z, start_layer=0, num_prefix=1, grid=(4, 4))

    smooth = torch.zeros(1, 2, 16, dtype=torch.bool)
    smooth[:, :, :8] = True  # top half active, same in both blocks
    noisy = smooth.clone()
    noisy[0, 0, 13] = True  # one isolated active token in the paused half, block 0 only
    s, n = decision_noise(trace_of(smooth)), decision_noise(trace_of(noisy))
    assert s["isolated"] == 0 and s["flip_rate"] == 0
    # the outlier itself, and its boundary neighbour (2, 0), which now has 3 of 5 neighbours active
    assert n["isolated"] == pytest.approx(2 / 32) and n["flip_rate"] == pytest.approx(1 / 16)
