"""The benchmark scripts run end to end at tiny sizes, so they cannot rot between the runs that commit numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_block_scaling_script_writes_its_table(tmp_path):
    out = tmp_path / "scaling"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks/block_scaling.py"), "--model", "deit_tiny_patch16_224",
                    "--tokens", "33", "9", "--rounds", "2", "--out", str(out)], check=True, env=env,
                   capture_output=True, text=True)
    result = json.loads(out.with_suffix(".json").read_text())
    first, second = result["rows"]
    assert (first["tokens"], first["chain_speedup"], first["macs_ratio"]) == (33, 1.0, 1.0)
    dim = 192  # DeiT-Tiny: 12 n d^2 + 2 n^2 d per block
    assert second["macs_ratio"] == (12 * 33 * dim * dim + 2 * 33 * 33 * dim) / (12 * 9 * dim * dim + 2 * 81 * dim)
    assert len(result["samples_s"]["chain@9"]) == 2
    assert f"| 9 | {second['macs_ratio']:.2f}x |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_onnx_speed_script_runs_on_a_small_model(tmp_path):
    out = tmp_path / "onnx"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks/onnx_speed.py"), "--model", "tpc_deit_tiny_patch16_224",
                    "--img-size", "64", "--keeps", "0.5", "--batch-sizes", "1", "--rounds", "1", "--main",
                    str(tmp_path / "no_main_job"), "--out", str(out)], check=True, env=env, capture_output=True,
                   text=True, cwd=tmp_path)
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["model"] == "tpc_deit_tiny_patch16_224" and result["fashion_mnist"] is None
    dense, tpc = result["deit_small"]
    assert dense["variant"] == "dense" and tpc["keep"] == 0.5 and tpc["gmacs"] < dense["gmacs"]
    assert "tpc_deit_tiny_patch16_224 (random weights):" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_eva_profile_script_splits_both_methods_time_at_matched_gmacs(tmp_path):
    out = tmp_path / "profile"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks/eva_profile.py"), "--model", "vit_small_patch16_rope_224",
                    "--img-size", "64", "--batch", "2", "--forwards", "1", "--rounds", "2", "--out", str(out)],
                   check=True, env=env, capture_output=True, text=True)
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["seconds"]) == {"tpc-free/3", "idlevit"}
    for name, row in result["seconds"].items():
        assert abs(result["gmacs_ratio"][name] - 0.5) < 0.05  # both at (about) half the dense GMACs
        assert row["matrix products"] > 0 and row["total"] == pytest.approx(
            sum(v for k, v in row.items() if k != "total"), abs=0.002)
    assert all(len(rounds) == 2 for rounds in result["rounds"].values()) and min(result["spread"].values()) >= 1.0
    assert "| matrix products |" in out.with_suffix(".md").read_text()


def test_gpu_bench_reuses_only_the_same_finished_run(tmp_path):
    """A (model, dtype) result is reused only when this exact run wrote it (a GPU lease cut off mid-run resumes);
    other arguments, another GPU or an unreadable file mean measuring again."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks/gpu_bench.py")
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    args = {"model": "deit_small_patch16_224", "dtype": "bfloat16", "specs": ["dense", "tpc@0.5"],
            "batch_sizes": [1, 256], "rounds": 10, "cuda_graphs": False, "extra": [], "device": "NVIDIA H100"}
    out = tmp_path / "gpu_x_deit_small_patch16_224_bfloat16"
    assert gpu_bench.finished(out, args) is None  # nothing written yet
    out.with_suffix(".json").write_text(json.dumps({"speed": [], "gpu_bench_args": args}))
    assert gpu_bench.finished(out, args)["gpu_bench_args"] == args
    for key, other in (("rounds", 5), ("device", "NVIDIA H200"), ("cuda_graphs", True), ("specs", ["dense"])):
        assert gpu_bench.finished(out, {**args, key: other}) is None
    out.with_suffix(".json").write_text('{"speed": [')  # cut off mid-write (not atomic elsewhere): measured again
    assert gpu_bench.finished(out, args) is None


def test_timm_coverage_script_reports_what_patches_and_what_errs(tmp_path):
    out = tmp_path / "coverage"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks/timm_coverage.py"), "--models", "deit_tiny_patch16_224",
                    "xcit_nano_12_p16_224", "eva02_tiny_patch14_224", "--out", str(out)], check=True, env=env,
                   capture_output=True, text=True)
    deit, xcit, eva = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert eva["works"] and eva["class"] == "Eva" and eva["keep_1_max_diff"] == 0.0  # rotary positions: the Eva adapter
    assert deit["works"] and deit["keep_1_max_diff"] == 0.0 and deit["mean_keep"] == pytest.approx(0.5, abs=0.01)
    assert 0.5 < deit["gmacs_share"] < 0.8  # paused tokens keep pooled keys
    assert not xcit["works"] and "Xcit" in xcit["error"]
    table = out.with_suffix(".md").read_text()
    assert "| works | 0.0e+00 |" in table and "error: tpcvit.patch works on" in table
