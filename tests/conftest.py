"""Shared fixtures: small TPC/timm ViTs on CPU. Tests never download anything."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# tpcvit must be imported before timm: it applies the torchvision import guard (hence no import sorting here)
import pytest  # noqa: E402
import torch  # noqa: E402

import tpcvit  # noqa: E402,F401
import timm  # noqa: E402,I001

# Under pytest-xdist (the slow tier runs one worker per core) each worker and every process it starts gets one
# thread: two workers with two OpenMP threads each on two cores spin-wait and run several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

# whole modules of the slow tier (subprocess CLI runs, training on real data, ONNX export); elsewhere single slow
# tests carry @pytest.mark.slow. `pytest -m "not slow"` is the unit tier to run while editing (< 60 s).
SLOW_MODULES = ("test_pipeline.py", "test_robustness.py", "test_export.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=5)


def small_tpc(name: str = "tpc_deit_small_patch16_224", **overrides):
    """A tiny TPC ViT (4x4 grid, 4 blocks) with mixed pause/restart decisions unless overridden."""
    torch.manual_seed(overrides.pop("seed", 0))
    kwargs = {**SMALL, "pause_bias_init": 0.0, "restart_bias_init": 0.0, **overrides}
    return timm.create_model(name, **kwargs)


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(6, 3, 32, 32)
