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
