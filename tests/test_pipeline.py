"""Training pipeline on real Fashion-MNIST: learns, resumes exactly after kill -9, DDP, bad inputs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tpcvit.config import ConfigError, load_config
from tpcvit.data import FASHION_MNIST_DIR, DataError, ImageFolderDataset, ToMode, read_idx

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir() and not os.environ.get("CI"),
    reason="needs Debian dataset-fashion-mnist (.ci/run installs it; CI fails rather than skips)",
)

TINY = ["model.kwargs={img_size: 28, patch_size: 7, in_chans: 1, embed_dim: 64, depth: 3, num_heads: 2}",
        "data.mean=[0.286]", "data.std=[0.353]", "data.aug.scale=[0.9,1.0]", "data.aug.hflip=0.0",
        "train.weight_decay=0.0", "train.lr=1e-3"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args, check=True, timeout=300):
    out = subprocess.run([sys.executable, "-m", "tpcvit", *args], capture_output=True, text=True, env=ENV,
                         timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"tpcvit {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def _summary(out) -> dict:
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fashion_mnist_idx_files_are_real():
    images = read_idx(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert set(np.unique(labels)) == set(range(10))


@pytest.mark.parametrize("model", ["deit_tiny_patch16_224", "tpc_deit_tiny_patch16_224"])
def test_two_epochs_on_a_few_hundred_real_images_learn(tmp_path, model):
    out = _cli("train", "-o", str(tmp_path / "run"), "--quiet", f"model.name={model}", *TINY,
               "data.train_limit=800", "data.val_limit=500", "train.epochs=2", "train.batch_size=16")
    summary = _summary(out)
    assert summary["top1"] > 25.0, summary  # chance is 10%
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "steps.jsonl", "best.safetensors", "last.safetensors", "last.json"):
        assert (run / name).exists(), name
    epochs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(set(e) >= {"loss", "top1", "top5", "keep_per_block", "gmacs"} for e in epochs)


def test_eval_and_analyze_report_on_a_trained_tpc_model(tmp_path):
    """The success paths of ``tpcvit eval`` and ``tpcvit analyze``: the metrics training reported for the same
    weights, and the restart analysis files; neither reads the training images (none exist here)."""
    run, data = tmp_path / "run", tmp_path / "data"
    common = ["model.name=tpc_deit_tiny_patch16_224", *TINY, "data.val_limit=200"]
    summary = _summary(_cli("train", "-o", str(run), "--quiet", *common, "data.train_limit=300", "train.epochs=1",
                            "train.batch_size=16"))
    data.mkdir()  # an idx folder holding only the test split: proof that evaluation never opens the training set
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (data / name).symlink_to(Path(FASHION_MNIST_DIR) / name)
    local = [*common, "data.kind=idx", f"data.path={data}"]
    metrics = json.loads(_cli("eval", "--quiet", "--checkpoint", str(run / "last.safetensors"), *local)
                         .stdout.strip().splitlines()[-1])
    assert metrics["images"] == 200 and metrics["top1"] == pytest.approx(summary["top1"])
    assert metrics["gmacs"] == pytest.approx(summary["gmacs"]) and 0 < min(metrics["keep_per_block"])
    out = _cli("analyze", "--quiet", "--checkpoint", str(run / "last.safetensors"), "-o", str(tmp_path / "an"), *local)
    assert "restart rate" in out.stdout and (tmp_path / "an" / "analysis.png").exists()
    result = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert result["images"] == 200 and result["depth"] == 3


def test_resume_after_kill_9_continues_exactly(tmp_path):
    common = ["--quiet", "model.name=tpc_deit_tiny_patch16_224", *TINY, "data.train_limit=320", "data.val_limit=64",
              "train.epochs=2", "train.batch_size=32", "train.ckpt_every_steps=3", "train.log_every_steps=1"]
    ref = tmp_path / "ref"
    _cli("train", "-o", str(ref), *common)
    run = tmp_path / "run"
    killed = _cli("train", "-o", str(run), *common, "train.halt_after_steps=14", check=False)
    assert killed.returncode == -9  # really died by SIGKILL, mid-epoch 2 (10 steps per epoch)
    meta = json.loads((run / "last.json").read_text())
    assert meta["global_step"] == 12 and meta["epoch"] == 1 and meta["step_in_epoch"] == 2
    _cli("train", "-o", str(run), "--resume", *common)
    ref_steps = (ref / "steps.jsonl").read_text().splitlines()
    run_steps = (run / "steps.jsonl").read_text().splitlines()
    assert run_steps == ref_steps  # the loss curve continues as if nothing happened
    def epochs(path):  # everything but the measured throughput
        return [{k: v for k, v in json.loads(ln).items() if k != "train_img_per_s"}
                for ln in (path / "metrics.jsonl").read_text().splitlines()]

    assert epochs(run) == epochs(ref)
    from safetensors.torch import load_file

    a, b = load_file(ref / "last.safetensors"), load_file(run / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_extended_by_a_cooldown_resumes_exactly_at_min_lr(tmp_path):
    common = ["--quiet", "model.name=deit_tiny_patch16_224", *TINY, "data.train_limit=128", "data.val_limit=32",
              "train.epochs=1", "train.batch_size=32", "train.log_every_steps=1", "train.min_lr=1e-5"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    _cli("train", "-o", str(ref), *common, "train.cooldown_epochs=1")
    _cli("train", "-o", str(run), *common)  # the schedule alone; then extended by one cooldown epoch
    _cli("train", "-o", str(run), "--resume", *common, "train.cooldown_epochs=1")
    steps = [json.loads(ln) for ln in (run / "steps.jsonl").read_text().splitlines()]
    assert [json.loads(ln) for ln in (ref / "steps.jsonl").read_text().splitlines()] == steps
    assert len(steps) == 8 and all(abs(s["lr"] - 1e-5) < 1e-12 for s in steps[4:]) and steps[0]["lr"] > 1e-4
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    from safetensors.torch import load_file

    a, b = load_file(ref / "last.safetensors"), load_file(run / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    """Pickles to ``open(path, "w")``: loading it with weights_only=False would create the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_planted_train_state_and_runs_none_of_it(tmp_path):
    common = ["--quiet", "model.name=deit_tiny_patch16_224", *TINY, "data.train_limit=128", "data.val_limit=32",
              "train.epochs=2", "train.batch_size=32", "train.ckpt_every_steps=2"]
    run = tmp_path / "run"
    killed = _cli("train", "-o", str(run), *common, "train.halt_after_steps=3", check=False)
    assert killed.returncode == -9
    state = run / json.loads((run / "last.json").read_text())["checkpoint"] / "train_state.pt"
    assert torch.load(state, weights_only=True)["rng"]["numpy"]["keys"].dtype == torch.int64  # plain tensors
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(marker), "scaler": None, "rng": {}}, state)
    before = sorted(p.name for p in run.rglob("*"))
    out = _cli("train", "-o", str(run), "--resume", *common, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "refusing to resume" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not marker.exists()  # nothing the file names ran
    assert sorted(p.name for p in run.rglob("*")) == before


def test_two_process_ddp_stays_in_sync(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "tpcvit", "train", "-o",
                          str(tmp_path / "ddp"), "--quiet", "model.name=tpc_deit_tiny_patch16_224", *TINY,
                          "data.train_limit=256", "data.val_limit=100", "train.epochs=1", "train.batch_size=16",
                          "train.log_every_steps=1"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = _summary(out)
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert summary["images"] == 100  # distributed evaluation covers every image exactly once
    steps = [json.loads(ln) for ln in (tmp_path / "ddp" / "steps.jsonl").read_text().splitlines()]
    assert steps[-1]["global_step"] == 256 // (16 * 2)


def _torchrun(*args, check=True):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "tpcvit", *args],
                         capture_output=True, text=True, env=ENV, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(out.stderr[-3000:])
    return out


@pytest.mark.parametrize("launch", ["workers", "ddp"])
def test_kill_9_and_resume_is_step_for_step_identical_with_workers_and_under_ddp(tmp_path, launch):
    """Data workers (augmentation seeded per sample) and 2-process DDP (every rank's RNG in the checkpoint)."""
    common = ["--quiet", "model.name=tpc_deit_tiny_patch16_224", *TINY, "train.batch_size=16",
              "train.ckpt_every_steps=3", "train.log_every_steps=1", "data.val_limit=64"]
    if launch == "workers":
        run_cli, common = _cli, [*common, "data.workers=2", "data.train_limit=160", "train.epochs=2"]
        halt, steps_per_epoch = 14, 10
    else:
        run_cli, common = _torchrun, [*common, "data.train_limit=128", "train.epochs=3"]
        halt, steps_per_epoch = 7, 4
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_cli("train", "-o", str(ref), *common)
    killed = run_cli("train", "-o", str(run), *common, f"train.halt_after_steps={halt}", check=False)
    assert killed.returncode != 0
    meta = json.loads((run / "last.json").read_text())
    assert 0 < meta["step_in_epoch"] < steps_per_epoch  # died mid-epoch, resumes mid-epoch
    run_cli("train", "-o", str(run), "--resume", *common)
    assert (run / "steps.jsonl").read_text().splitlines() == (ref / "steps.jsonl").read_text().splitlines()
    from safetensors.torch import load_file

    a, b = load_file(ref / "last.safetensors"), load_file(run / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- bad input
def _folder(tmp_path: Path) -> Path:
    """A tiny ImageNet-layout dataset with RGB, grayscale, RGBA, odd sizes, a corrupt and a truncated file."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(6):
                arr = rng.integers(0, 255, (20 + 7 * i, 31, 3), dtype=np.uint8)
                img = Image.fromarray(arr)
                img = {0: img, 1: img.convert("L"), 2: img.convert("RGBA")}.get(i % 3, img)
                img.save(d / f"{i}.png")
    (tmp_path / "data" / "train" / "cat" / "corrupt.jpg").write_bytes(b"not an image at all")
    good = (tmp_path / "data" / "train" / "dog" / "0.png").read_bytes()
    (tmp_path / "data" / "train" / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    return tmp_path / "data"


def test_corrupt_images_are_skipped_and_counted_or_raise(tmp_path):
    root = _folder(tmp_path)
    ds = ImageFolderDataset(root / "train", transform=None, skip_corrupt=True)
    items = [ds[i] for i in range(len(ds))]
    assert len(items) == 14 and sum(item is not None for item in items) == 12  # broken files: None, no stand-in
    assert sorted(Path(p).name for p in ds.skipped) == ["corrupt.jpg", "truncated.png"]
    strict = ImageFolderDataset(root / "train", skip_corrupt=False)
    with pytest.raises(DataError, match="corrupt, oversized or unreadable image .*corrupt.jpg.*skip_corrupt"):
        [strict[i] for i in range(len(strict))]


def test_any_mode_and_size_feeds_the_model(tmp_path):
    root = _folder(tmp_path)
    out = _cli("train", "-o", str(tmp_path / "run"), "--quiet", "model.name=tpc_deit_tiny_patch16_224",
               "model.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
               "data.kind=folder", f"data.path={root}", "train.batch_size=4", "eval.batch_size=4")
    summary = _summary(out)
    assert summary["skipped_images"] == 2 and summary["images"] == 12
    # with worker processes the skips are seen too, and named
    out = _cli("train", "-o", str(tmp_path / "run2"), "--quiet", "model.name=deit_tiny_patch16_224",
               "model.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
               "data.kind=folder", f"data.path={root}", "train.batch_size=4", "eval.batch_size=4", "data.workers=2")
    summary = _summary(out)
    assert summary["skipped_images"] == 2
    assert sorted(Path(f).name for f in summary["skipped_files"]) == ["corrupt.jpg", "truncated.png"]
    for mode in ("RGBA", "LA", "P", "I;16", "CMYK", "1"):
        img = Image.new(mode, (5, 7))
        assert ToMode("RGB")(img).mode == "RGB" and ToMode("L")(img).mode == "L"


def test_bad_inputs_fail_with_one_clear_line_and_leave_nothing(tmp_path):
    out_dir = tmp_path / "never"
    cases = {
        ("data.kind=folder", f"data.path={tmp_path / 'missing'}"): "image folder not found",
        ("data.kind=idx", f"data.path={tmp_path}"): "idx dataset not found",
        ("train.lr=fast",): "train.lr must be a number",
        ("train.epochs=0",): "train.epochs must be > 0",
        ("train.amp=int8",): "train.amp must be one of",
        ("trian.lr=1",): "did you mean 'train.lr'",
        ("model.name=tpc_nope",): "unknown model 'tpc_nope'",
        ("model.tpc={target_keep: 1.5}",): "target_keep must be in",
    }
    for args, message in cases.items():
        res = _cli("train", "-o", str(out_dir), "--quiet", *TINY, *args, check=False)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        last = res.stderr.strip().splitlines()[-1]
        assert message in last and last.startswith("tpcvit train: error:"), (args, last)
        assert not out_dir.exists(), args


def test_wrong_checkpoint_is_rejected_clearly(tmp_path):
    run = tmp_path / "run"
    _cli("train", "-o", str(run), "--quiet", "model.name=tpc_deit_tiny_patch16_224", *TINY, "data.train_limit=64",
         "data.val_limit=32", "train.batch_size=32")
    other = [a.replace("depth: 3", "depth: 2") for a in TINY]
    res = _cli("eval", "--checkpoint", str(run / "best.safetensors"), "--quiet",
               "model.name=tpc_deit_tiny_patch16_224", *other, "data.val_limit=32", check=False)
    assert res.returncode == 2 and "checkpoint does not fit" in res.stderr
    res = _cli("eval", "--checkpoint", str(tmp_path / "nope.safetensors"), "--quiet",
               "model.name=tpc_deit_tiny_patch16_224", *TINY, "data.val_limit=32", check=False)
    assert res.returncode == 2 and "checkpoint not found" in res.stderr
    res = _cli("train", "-o", str(run), "--quiet", *TINY, check=False)
    assert res.returncode == 2 and "--resume" in res.stderr  # never overwrites an existing run


def test_config_files_in_repo_are_valid():
    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        cfg = load_config(path)
        assert cfg["model"]["name"]
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")


def test_pipeline_end_to_end_writes_table_metrics_and_plot(tmp_path):
    out = _cli("pipeline", "-c", "configs/fmnist_main.yaml", "-o", str(tmp_path / "p"), "--quiet", *TINY,
               "model.name=tpc_deit_tiny_patch16_224", "data.train_limit=256", "data.val_limit=128",
               "train.batch_size=32", "pipeline.dense_epochs=1", "pipeline.tpc_epochs=1", "pipeline.bench_rounds=1",
               "pipeline.bench_batch_sizes=[1,16]", "pipeline.budget_keeps=[0.5]", "pipeline.budget_decide_every=[1,2]")
    assert "| tpc adaptive |" in out.stdout and "| tpc budget 50% |" in out.stdout
    assert "| dense + 1 epochs |" in out.stdout  # the dense model with TPC's extra epochs: same total training
    result = json.loads((tmp_path / "p" / "results.json").read_text())
    assert set(result["eval"]) == {"dense", "dense, lean executor", "dense + 1 epochs", "tpc adaptive",
                                   "tpc budget 50%", "tpc budget 50%/2"}
    # deciding in every 2nd block: the same tokens per block, one controller head fewer counted
    every, second = result["eval"]["tpc budget 50%"], result["eval"]["tpc budget 50%/2"]
    assert every["keep_per_block"] == second["keep_per_block"] and second["gmacs"] < every["gmacs"]
    assert "| dense, lean executor |" in out.stdout  # the speed baseline on the executor TPC's blocks run with
    extra = yaml.safe_load((tmp_path / "p" / "dense_extra" / "config.yaml").read_text())
    tpc = yaml.safe_load((tmp_path / "p" / "tpc" / "config.yaml").read_text())
    assert extra["train"] == tpc["train"] and extra["distill"] == tpc["distill"] and extra["data"] == tpc["data"]
    assert result["eval"]["tpc budget 50%"]["gmacs"] < result["eval"]["dense"]["gmacs"]
    assert {r["batch"] for r in result["speed"]} == {1, 16}
    png = (tmp_path / "p" / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(tmp_path / "p" / "results.png").size[0] > 500


def test_bench_command_writes_rows(tmp_path):
    _cli("bench", "--model", "tpc_deit_tiny_patch16_224", "--img-size", "64", "--batch-sizes", "2", "--rounds", "2",
         "--keeps", "1.0", "0.5", "--out", str(tmp_path / "speed"))
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "dense-lean", "tpc@100%", "tpc@50%"]
    assert rows[3]["gmacs"] < rows[2]["gmacs"] and all(r["img_per_s"] > 0 for r in rows)
    assert rows[1]["gmacs"] == rows[0]["gmacs"]  # the same dense model on the lean executor
    md = (tmp_path / "speed.md").read_text()
    assert "speed-up/FLOPs" in md and f"{rows[0]['spread']:.2f}x |" in md  # the round spread is printed
    assert "| tpc@50% | 2 | dense-lean |" in md  # and each variant over dense-lean, paired


def test_bench_on_a_plain_timm_vit_times_training_free_tpc_and_names_bad_models(tmp_path):
    """``tpcvit bench --model <timm ViT>``: TPC patched on training-free at each keep (it was a traceback); a peer's
    or an unknown name: a one-line error."""
    _cli("bench", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--batch-sizes", "2", "--rounds", "1",
         "--keeps", "1.0", "0.5", "--quiet", "--out", str(tmp_path / "speed"))
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "dense-lean", "tpc-free@100%", "tpc-free@50%"]
    assert rows[2]["gmacs"] == pytest.approx(rows[0]["gmacs"], rel=1e-6) and rows[3]["gmacs"] < 0.8 * rows[0]["gmacs"]
    for model, message in (("tome_deit_tiny_patch16_224", "--methods dense,tpc-free@0.5,tome@0.5"),
                           ("deit_tinny_patch16_224", "unknown model")):
        res = _cli("bench", "--model", model, "--keeps", "0.5", "--rounds", "1", check=False)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-800:]


def test_bench_methods_compares_tpc_and_peers_on_real_images(tmp_path):
    dense = tmp_path / "dense"
    _cli("train", "-o", str(dense), "--quiet", "model.name=deit_tiny_patch16_224", *TINY, "data.train_limit=64",
         "data.val_limit=32", "train.batch_size=32")
    sets = [a for o in [*TINY, "data.train_limit=64", "data.val_limit=48", "model.name=tpc_deit_tiny_patch16_224"]
            for a in ("--set", o)]
    missing = _cli("bench", "-c", "configs/fmnist_main.yaml", "--methods", "dense,tome-ft@0.6", *sets, check=False)
    assert missing.returncode != 0 and "--weights tome-ft=PATH" in missing.stderr
    ckpt = dense / "best.safetensors"
    refusals = {  # what would score the wrong model is refused, with the fix in one line
        ("dense,tpc@0.6", f"dense={ckpt}"): "tpc has learned parts: give its fine-tuned checkpoint with --weights tpc=",
        ("dense,tome@0.6", f"evit={ckpt}"): "--weights evit: no method in --methods uses it",
        ("dense,tpc-keys@0.6", f"tpc-keys={ckpt}"): "trained with paused_keys: false",
    }
    for (methods, weight), message in refusals.items():
        res = _cli("bench", "-c", "configs/fmnist_main.yaml", "--methods", methods, "--weights", weight, *sets,
                   check=False)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-800:]
    # dense weights for TPC / A-ViT only when asked for explicitly (here: to check the harness itself)
    _cli("bench", "-c", "configs/fmnist_main.yaml", "--methods",
         "dense,tpc@0.6,tome@0.6,tome-ft@0.6,evit@0.8,avit=3,tpc-free@0.6,tpc-free@0.6/2",
         "--weights", f"dense={ckpt}", "--weights", f"tome-ft={ckpt}", "--weights", f"tpc={ckpt}",
         "--weights", f"avit={ckpt}", "--batch-sizes", "1", "8", "--rounds", "1",
         "--calib-images", "16", "--quiet", "--out", str(tmp_path / "cmp"), *sets)
    result = json.loads((tmp_path / "cmp.json").read_text())
    points = result["points"]
    assert list(points) == ["dense", "tpc@60%", "tome@60%", "tome-ft@60%", "evit@80%", "avit=3", "tpc-free@60%",
                            "tpc-free@60%/2"]
    assert points["tpc-free@60%"]["matched"] and points["tpc-free@60%/2"]["matched"]
    assert points["tpc-free@60%/2"]["knob"] != points["tpc-free@60%"]["knob"]  # other decisions: another keep
    assert points["tome-ft@60%"]["top1"] == points["tome@60%"]["top1"]  # same weights here: same model
    assert points["tome@60%"]["matched"] and points["tpc@60%"]["matched"]
    assert all(0 <= p["top1"] <= 100 and p["images"] == 48 for p in points.values())
    assert points["avit=3"]["top1"] == points["dense"]["top1"]  # threshold 3 on 3 blocks: never halts = dense
    assert points["tome@60%"]["gmacs_ratio"] == pytest.approx(0.6, abs=0.06)
    assert {(r["variant"], r["batch"]) for r in result["speed"]} >= {("evit@80%", 1), ("evit@80%", 8)}
    assert "| tome | 60% |" in (tmp_path / "cmp.md").read_text() and "| tpc-free/2 | 60% |" in (
        tmp_path / "cmp.md").read_text()
    assert Image.open(tmp_path / "cmp.png").size[0] > 800


@pytest.mark.parametrize("name,peer", [("avit_deit_tiny_patch16_224", "{target_depth: 0.5}"),
                                       ("evit_deit_tiny_patch16_224", "{keep_rate: 0.5}"),
                                       ("tome_deit_tiny_patch16_224", "{tome_r: 4}")])
def test_peers_fine_tune_with_the_same_pipeline(tmp_path, name, peer):
    out = _cli("train", "-o", str(tmp_path / "p"), "--quiet", f"model.name={name}", f"model.peer={peer}", *TINY,
               "data.train_limit=64", "data.val_limit=32", "train.batch_size=16", "train.log_every_steps=1")
    summary = _summary(out)
    steps = [json.loads(ln) for ln in (tmp_path / "p" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(np.isfinite(s["loss"]) and 0 < s["keep"] <= 1 for s in steps)
    if name.startswith("avit"):
        assert all("ponder" in s and "dist" in s for s in steps)
    else:
        assert summary["keep_per_block"][-1] < 0.6  # EViT's / ToMe's token count after its reductions
    assert summary["gmacs"] > 0 and summary["images"] == 32


def test_token_labelling_trains_lvvit_with_dense_per_token_targets(tmp_path):
    labels = read_idx(Path(FASHION_MNIST_DIR) / "train-labels-idx1-ubyte.gz")
    order = np.random.default_rng(0).permutation(len(labels))[:64]  # the data.train_limit=64 subset, in order
    np.save(tmp_path / "tokens.npy", np.repeat(labels[order][:, None], 49, axis=1).astype(np.int64))
    lvvit = ["model.name=tpc_lvvit_s", "model.kwargs={img_size: 28, patch_size: 4, in_chans: 1, embed_dim: 32, "
             "depth: 2, num_heads: 2, stem_dim: 8}", "data.mean=[0.286]", "data.std=[0.353]", "data.aug.hflip=0.0",
             "data.aug.scale=[1.0,1.0]", "data.train_limit=64", "data.val_limit=32", "train.batch_size=16",
             "train.log_every_steps=1"]
    out = _cli("train", "-o", str(tmp_path / "tl"), "--quiet", *lvvit, f"data.token_labels={tmp_path / 'tokens.npy'}")
    steps = [json.loads(ln) for ln in (tmp_path / "tl" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(np.isfinite(s["loss"]) for s in steps) and _summary(out)["images"] == 32
    bad = _cli("train", "-o", str(tmp_path / "b1"), *lvvit, "data.aug.hflip=0.5",
               f"data.token_labels={tmp_path / 'tokens.npy'}", check=False)
    assert bad.returncode != 0 and "data.aug.hflip" in bad.stderr and "per token position" in bad.stderr
    np.save(tmp_path / "short.npy", np.zeros((10, 49), dtype=np.int64))
    bad = _cli("train", "-o", str(tmp_path / "b2"), *lvvit, f"data.token_labels={tmp_path / 'short.npy'}", check=False)
    assert bad.returncode != 0 and "expected [64 training images" in bad.stderr
    assert not (tmp_path / "b2").exists()
    bad = _cli("train", "-o", str(tmp_path / "b3"), *lvvit, "model.name=tpc_deit_tiny_patch16_224", TINY[0],
               f"data.token_labels={tmp_path / 'tokens.npy'}", check=False)
    assert bad.returncode != 0 and "token-labelling head" in bad.stderr


def test_swin_trains_and_evaluates_through_the_pipeline(tmp_path):
    swin = ["model.name=tpc_swin_tiny_patch4_window7_224", "model.kwargs={img_size: 32, patch_size: 2, in_chans: 1, "
            "embed_dim: 16, depths: [2, 2], num_heads: [2, 2], window_size: 4}", "data.mean=[0.286]",
            "data.std=[0.353]", "data.train_limit=64", "data.val_limit=32", "train.batch_size=16"]
    summary = _summary(_cli("train", "-o", str(tmp_path / "s"), "--quiet", *swin))
    assert len(summary["keep_per_block"]) == 4 and summary["keep_per_block"][0] == 1.0
    assert 0 < summary["gmacs"] and summary["images"] == 32


def test_full_augmentation_bf16_and_hard_distillation_into_a_distilled_student(tmp_path):
    teacher = tmp_path / "teacher"
    _cli("train", "-o", str(teacher), "--quiet", "model.name=deit_tiny_patch16_224", *TINY, "data.train_limit=64",
         "data.val_limit=32", "train.batch_size=32")
    out = _cli("train", "-o", str(tmp_path / "student"), "--quiet", "model.name=tpc_deit_tiny_distilled_patch16_224",
               *TINY, "data.train_limit=64", "data.val_limit=32", "train.batch_size=16", "train.amp=bf16",
               "data.mixup=0.8", "data.cutmix=1.0", "data.label_smoothing=0.1", "data.aug.re_prob=0.25",
               "data.aug.auto_augment=rand-m9-mstd0.5-inc1", f"distill.teacher={teacher / 'best.safetensors'}",
               "distill.teacher_model=deit_tiny_patch16_224", "distill.type=hard", "train.log_every_steps=1")
    summary = _summary(out)
    steps = [json.loads(ln) for ln in (tmp_path / "student" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(np.isfinite(s["loss"]) for s in steps)
    assert summary["images"] == 32 and 0 <= summary["top1"] <= 100


def test_ablate_runs_every_variant_and_writes_the_table(tmp_path):
    dense = tmp_path / "dense"
    _cli("train", "-o", str(dense), "--quiet", "model.name=deit_tiny_patch16_224", *TINY, "data.train_limit=64",
         "data.val_limit=32", "train.batch_size=32")
    _cli("ablate", "-c", "configs/fmnist_ablation.yaml", "-o", str(tmp_path / "abl"), "--quiet",
         "--dense", str(dense / "best.safetensors"), "--seeds", "0", *TINY, "data.train_limit=64",
         "data.val_limit=32", "train.batch_size=32", "train.epochs=1")
    result = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert set(result["summary"]) == {"tpc full", "no restart", "no smoothing", "no stabilizer"}
    assert all(len(v) == 1 and 0 <= v[0]["isolated"] <= 1 for v in result["runs"].values())
    assert all(v["top1_worst"] == v["top1_per_seed"][0] == v["top1_mean"] for v in result["summary"].values())
    assert "| no restart |" in (tmp_path / "abl" / "ablation.md").read_text()
    assert Image.open(tmp_path / "abl" / "ablation.png").format == "PNG"


def test_evidence_runs_end_to_end_reuses_finished_runs_and_writes_the_schema(tmp_path):
    out = tmp_path / "ev"
    args = ["evidence", "-c", "configs/evidence_fmnist49.yaml", "-o", str(out), "--quiet", "--out",
            str(tmp_path / "evidence_tiny"), *TINY, "data.train_limit=300", "data.val_limit=200", "train.epochs=2",
            "train.cooldown_epochs=0",
            "train.batch_size=32",
            "evidence.methods=[tpc,idlevit,tome,tpc-free,dense,tpc-norestart,tpc-uniform,tpc-adaptive,tpc-every2,"
            "tpc-every5,tpc-free-every2]",
            "evidence.seeds=[0,1]",
            "evidence.budgets=[0.6,0.8]", "evidence.train_budget=0.7", "evidence.finetune_epochs=1",
            "evidence.finetune_train_limit=200", "evidence.calib_images=32", "model.tpc={target_keep: 0.6}"]
    _cli(*args, timeout=900)
    result = json.loads((tmp_path / "evidence_tiny.json").read_text())
    assert result["tokens"] == 16 and len(result["dense"]["curve"]) == 2
    assert set(result["dense"]) >= {"top1", "gmacs", "curve", "converged", "last20_gain"}
    runs = result["runs"]
    assert {(r["method"], r["seed"]) for r in runs if r["budget"] == 0.6} == {
        ("tpc", 0), ("tpc", 1), ("idlevit", 0), ("idlevit", 1), ("tome", None), ("tpc-free", None),
        ("tpc-norestart", 0), ("tpc-norestart", 1), ("tpc-uniform", 0), ("tpc-uniform", 1), ("tpc-adaptive", 0),
        ("tpc-adaptive", 1), ("tpc-every2", 0), ("tpc-every2", 1), ("tpc-every5", 0), ("tpc-every5", 1),
        ("tpc-free-every2", None)}
    # tpc-uniform: TPC's own weights (no fine-tune of its own) in budget mode without the learned schedule
    assert not any((out / "ft" / m).exists() for m in ("tpc-uniform", "tpc-adaptive", "tpc-every2"))
    ledger = tmp_path / "evidence_tiny_runs"
    tpc0, uniform0 = (json.loads((ledger / f"{m}_seed0.json").read_text()) for m in ("tpc", "tpc-uniform"))
    assert len(tpc0["keep_profile"]) == 2 and "keep_profile" not in uniform0 and tpc0["curve"] == uniform0["curve"]
    assert all(set(r) >= {"method", "budget", "seed", "top1", "gmacs", "gmacs_ratio"} for r in runs)
    for r in runs:  # matched compute: every method at (about) the budget it is reported at
        if r["method"] != "dense":
            assert abs(r["gmacs_ratio"] - r["budget"]) < 0.1, r
    summary = result["summary"]
    assert summary["tpc_vs_best_peer"]["0.6"]["best_peer"] in ("idlevit", "tome")
    assert summary["tpc_vs_best_peer"]["0.6"]["n"] == 2
    assert {"tpc-norestart", "tpc-uniform", "tpc-every2"} <= set(summary["claims"])
    every2 = json.loads((ledger / "tpc-every2_seed0.json").read_text())
    assert every2["keep_profile"] == tpc0["keep_profile"]  # TPC's weights and learned schedule, fewer decisions
    assert json.loads((ledger / "tpc-every5_seed0.json").read_text())["curve"] == tpc0["curve"]
    assert json.loads((ledger / "tpc-free-every2.json").read_text())["options"]["decide_every"] == 2
    assert set(summary["tpc_free_minus_tome"]) == {"0.6", "0.8"}
    assert set(summary["tpc_vs_peers"]) == {"idlevit", "tome"} and summary["tpc_vs_dense"]["0.6"]["n"] == 2
    assert summary["tpc_vs_peers"][summary["tpc_vs_best_peer"]["0.6"]["best_peer"]]["0.6"] == {
        k: v for k, v in summary["tpc_vs_best_peer"]["0.6"].items() if k != "best_peer"}
    assert (tmp_path / "evidence_tiny.md").read_text().count("|") > 20 and (tmp_path / "evidence_tiny.png").exists()
    assert "The keep schedule TPC learned" in (tmp_path / "evidence_tiny.md").read_text()
    # finished fine-tunes and evaluations are reused: a second run trains nothing and gives the same numbers
    stamp = (out / "ft" / "tpc" / "seed0" / "last.safetensors").stat().st_mtime
    _cli(*args, timeout=900)
    again = json.loads((tmp_path / "evidence_tiny.json").read_text())
    assert (out / "ft" / "tpc" / "seed0" / "last.safetensors").stat().st_mtime == stamp
    assert [r["top1"] for r in again["runs"]] == [r["top1"] for r in runs]
    # a later session without the run folders (weights are not committed) rebuilds the results from the ledger
    ledger_dir = tmp_path / "evidence_tiny_runs"
    ledger = sorted(p.name for p in ledger_dir.iterdir())
    assert "dense_backbone.json" in ledger and "tpc_seed1.json" in ledger and "tome.json" in ledger
    shutil.rmtree(out)
    _cli(*args, timeout=900)
    assert not (out / "ft").exists() and not (out / "dense").exists()  # nothing re-trained
    third = json.loads((tmp_path / "evidence_tiny.json").read_text())
    assert [r["top1"] for r in third["runs"]] == [r["top1"] for r in runs]
    # --report-only trains and evaluates nothing: unfinished runs are left out and listed
    (ledger_dir / "idlevit_seed1.json").unlink()
    _cli(*args, "--report-only", timeout=900)
    partial = json.loads((tmp_path / "evidence_tiny.json").read_text())
    assert partial["missing"] == ["idlevit_seed1"] and not (out / "ft").exists() and not (out / "dense").exists()
    assert ("idlevit", 1) not in {(r["method"], r["seed"]) for r in partial["runs"]}
    assert "Not finished yet (left out; the job resumes them): idlevit_seed1" in (
        tmp_path / "evidence_tiny.md").read_text()
    # every run records the dense weights it started from; a dense model re-trained into other weights (another kind
    # of CPU) makes every run stale: the job says so and redoes them from the new weights
    runs_in_ledger = [p for p in ledger_dir.glob("*.json") if p.name != "dense_backbone.json"]
    digest = json.loads((ledger_dir / "dense_backbone.json").read_text())["weights_sha256"]
    assert len(digest) == 64 and {json.loads(p.read_text())["dense_sha256"] for p in runs_in_ledger} == {digest}
    for p in [ledger_dir / "dense_backbone.json", *runs_in_ledger]:  # as if the ledger came from another machine
        record = json.loads(p.read_text())
        record["weights_sha256" if p.name == "dense_backbone.json" else "dense_sha256"] = "0" * 64
        p.write_text(json.dumps(record))
    (ledger_dir / "tpc_seed1.json").unlink()  # one run left to do: it needs the dense weights, trained here anew
    res = _cli(*[a for a in args if a != "--quiet"], timeout=900)
    assert "differs from the one the ledger's runs started from" in res.stdout + res.stderr
    assert (out / "ft" / "tpc" / "seed0" / "last.safetensors").exists()  # fine-tuned again, from the new weights
    assert json.loads((ledger_dir / "dense_backbone.json").read_text())["weights_sha256"] == digest
    assert {json.loads(p.read_text())["dense_sha256"] for p in runs_in_ledger} == {digest}
    # a changed fine-tune recipe never reuses a run made with the old one
    _cli(*[a for a in args if not a.startswith("evidence.methods")], "evidence.methods=[tpc]", "evidence.seeds=[0]",
         "evidence.finetune_lr=1e-4", timeout=900)
    assert (out / "ft" / "tpc" / "seed0" / "last.safetensors").exists()  # trained again
    assert not list((tmp_path / "evidence_tiny_runs").glob("*.safetensors"))  # no weights in the committed ledger
    record = json.loads((tmp_path / "evidence_tiny_runs" / "tpc_seed0.json").read_text())
    assert record["recipe"]["finetune_lr"] == 1e-4


def test_evidence_whose_backbone_starts_from_a_missing_model_says_which_to_train_first(tmp_path):
    res = _cli("evidence", "-c", "configs/evidence_fmnist196.yaml", "-o", str(tmp_path / "ev"), "--quiet", "--out",
               str(tmp_path / "ev196"), *TINY, "data.val_limit=64", "evidence.calib_images=16",
               f"model.init={tmp_path / 'missing.safetensors'}", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-1500:]
    assert "train that one first" in res.stderr.strip().splitlines()[-1]


def test_user_errors_exit_2_with_one_line_and_leave_nothing(tmp_path):
    """Output path blocked by a file, diverging lr, mismatched class folders, zero batch size: one line, no
    traceback, no output folder left behind."""
    (tmp_path / "blocker").write_text("a file where a folder should be")
    data = tmp_path / "data"
    for split, classes in (("train", ["cat", "dog"]), ("val", ["cat", "eel"])):
        for c in classes:
            (data / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(data / split / c / "0.png")
    out = tmp_path / "never"
    cases = [
        (["train", "-o", str(tmp_path / "blocker" / "run"), *TINY], "a file is in the way"),
        (["export", "--model", "deit_tiny_patch16_224", "--mode", "dense", "--out",
          str(tmp_path / "blocker" / "m.onnx")], "a file is in the way"),
        (["train", "-o", str(out), *TINY, "data.kind=folder", f"data.path={data}"], "different classes"),
        (["bench", "--batch-sizes", "0"], "must be >= 1"),
        (["bench", "--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
    ]
    for args, message in cases:
        res = _cli(*args, *(["--quiet"] if args[0] == "train" else []), check=False)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (args, res.stderr[-1500:])
        assert message in res.stderr.strip().splitlines()[-1], (args, res.stderr)
        assert not out.exists()
    res = _cli("train", "-o", str(tmp_path / "nan"), "--quiet", *TINY, "train.lr=1e6", "data.train_limit=256",
               "data.val_limit=32", "train.batch_size=16", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
        res.stderr[-1500:]


def test_ctrl_c_stops_training_with_one_line_and_keeps_the_run_resumable(tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tpcvit", "train", "-o", str(run), "--quiet", *TINY,
                             "data.train_limit=2000", "data.val_limit=32", "train.batch_size=16", "train.epochs=20",
                             "train.ckpt_every_steps=5"], stderr=subprocess.PIPE, text=True, env=ENV,
                            # a shell running this suite in the background hands SIGINT down ignored; Ctrl-C reaches
                            # a real `tpcvit train` with the default disposition
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (run / "last.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-1500:]
    assert json.loads((run / "last.json").read_text())["global_step"] >= 5


def test_resume_refuses_another_config_and_a_dead_start_begins_clean(tmp_path):
    common = ["--quiet", *TINY, "data.train_limit=64", "data.val_limit=32", "train.batch_size=16",
              "train.ckpt_every_steps=2", "train.log_every_steps=1"]
    run = tmp_path / "run"
    _cli("train", "-o", str(run), *common, "train.epochs=2", "train.halt_after_steps=3", check=False)
    before = (run / "steps.jsonl").read_text()
    res = _cli("train", "-o", str(run), "--resume", *common, "train.epochs=3", check=False)
    assert res.returncode == 2 and "train.epochs: 2 -> 3" in res.stderr and "Traceback" not in res.stderr
    assert (run / "steps.jsonl").read_text() == before  # nothing lost or changed
    # a run that died before its first checkpoint: a fresh start does not append to its logs
    dead = tmp_path / "dead"
    _cli("train", "-o", str(dead), *common, "train.ckpt_every_steps=0", "train.halt_after_steps=2", check=False)
    assert not (dead / "last.json").exists() and (dead / "steps.jsonl").exists()
    _cli("train", "-o", str(dead), *common)
    steps = [json.loads(ln)["global_step"] for ln in (dead / "steps.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 1


def test_gpu_evidence_script_stops_at_its_deadline_and_packs_ledger_and_report(tmp_path):
    """scripts/gpu_evidence.sh (issue 11 in one GPU lease) on this CPU: the job is stopped cleanly at the deadline,
    the report is written from the runs that finished, and ledger + report are packed for the device tool's $OUT."""
    import tarfile

    out, results = tmp_path / "out", tmp_path / "res" / "evidence_tiny"
    out.mkdir()
    overrides = [f"output={tmp_path / 'run'}", *TINY, "data.train_limit=300", "data.val_limit=200", "train.epochs=2",
                 "train.cooldown_epochs=0", "train.batch_size=32", "evidence.methods=[tpc,tome,dense,evit,idlevit]",
                 "evidence.seeds=[0,1,2,3,4,5,6,7]", "evidence.budgets=[0.6,0.8]", "evidence.train_budget=0.7",
                 "evidence.finetune_epochs=1", "evidence.finetune_train_limit=200", "evidence.calib_images=32",
                 "model.tpc={target_keep: 0.6}"]
    env = {**ENV, "OUT": str(out), "RESULTS": str(results), "DATA": str(tmp_path / "no-data"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/gpu_evidence.sh", "configs/evidence_fmnist49.yaml", "25", *overrides],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "stopped at the deadline" in done.stdout and "(no GPU)" in done.stdout
    ledger = {p.name for p in (results.parent / "evidence_tiny_runs").iterdir()}
    assert "dense_backbone.json" in ledger and "tpc_seed0.json" in ledger
    assert "idlevit_seed7.json" not in ledger  # the deadline (~1/3 of the job here) came first: stopped, not done
    report = json.loads(results.with_suffix(".json").read_text())
    assert {r["method"] for r in report["runs"]} >= {"tpc", "tome"}
    with tarfile.open(out / "evidence_fmnist49.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("evidence_tiny_runs/tpc_seed0.json") for n in names)
    assert any(n.endswith("evidence_tiny.md") for n in names)


def test_evidence_starts_from_supplied_dense_weights_without_training_them(tmp_path):
    """evidence.dense_weights: a converged model the user already has is the common start; nothing dense is trained,
    the ledger keys the runs to its digest, and other weights in the same file make every run stale."""
    import timm
    from safetensors.torch import save_file

    from tpcvit.checkpoint import weights_digest
    from tpcvit.config import load_config

    kwargs = load_config(None, TINY[:1])["model"]["kwargs"]
    weights = tmp_path / "pretrained.safetensors"

    def save(seed: int) -> str:
        torch.manual_seed(seed)
        model = timm.create_model("deit_tiny_patch16_224", num_classes=10, **kwargs)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        return weights_digest(weights)

    first = save(0)
    out, report = tmp_path / "ev", tmp_path / "evidence_tiny"
    args = ["evidence", "-c", "configs/evidence_fmnist49.yaml", "-o", str(out), "--out", str(report), *TINY,
            "data.train_limit=100", "data.val_limit=64", "evidence.methods=[tome,dense]", "evidence.seeds=[0]",
            "evidence.budgets=[0.6]", "evidence.finetune_epochs=1", "evidence.finetune_train_limit=64",
            "evidence.calib_images=16", f"evidence.dense_weights={weights}"]
    _cli(*args, "--quiet", timeout=600)
    assert not (out / "dense").exists()  # the supplied model is not trained
    ledger = tmp_path / "evidence_tiny_runs"
    record = json.loads((ledger / "dense_backbone.json").read_text())
    assert record["weights_sha256"] == first and record["curve"] == [] and record["converged"] is None
    assert json.loads((ledger / "dense_seed0.json").read_text())["dense_sha256"] == first
    assert "supplied weights" in report.with_suffix(".md").read_text()
    second = save(1)  # other weights under the same name: every run is redone from them
    res = _cli(*args, timeout=600)
    assert "differs from the one the ledger's runs started from" in res.stdout + res.stderr
    assert json.loads((ledger / "dense_seed0.json").read_text())["dense_sha256"] == second
    missing = [a for a in args[:-1] if a != str(report)]
    missing[missing.index("--out") + 1] = str(tmp_path / "other")  # a fresh ledger: the weights are needed
    res = _cli(*missing, f"evidence.dense_weights={tmp_path / 'nope.safetensors'}", "--quiet", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "evidence.dense_weights" in res.stderr.strip().splitlines()[-1]


def test_evidence_keeps_the_trained_dense_backbone_and_a_fresh_machine_fine_tunes_from_it(tmp_path):
    """evidence.dense_copy: the dense backbone trained by the job is kept (to commit); a later session whose runs/
    is gone fine-tunes the missing runs from that copy instead of re-training (so another kind of CPU, which would
    train other weights, still continues the ledger); a copy holding other weights is neither used nor kept."""
    from safetensors.torch import load_file, save_file

    from tpcvit.checkpoint import weights_digest

    kept, out, report = tmp_path / "backbones" / "dense.safetensors", tmp_path / "ev", tmp_path / "evidence_tiny"
    args = ["evidence", "-c", "configs/evidence_fmnist49.yaml", "-o", str(out), "--out", str(report), *TINY,
            "data.train_limit=200", "data.val_limit=64", "train.epochs=1", "train.cooldown_epochs=0",
            "train.batch_size=32", "evidence.methods=[evit,dense]", "evidence.budgets=[0.6]",
            "evidence.train_budget=0.6", "evidence.finetune_epochs=1", "evidence.finetune_train_limit=64",
            "evidence.calib_images=16", f"evidence.dense_copy={kept}"]
    _cli(*args, "evidence.seeds=[0]", "--quiet", timeout=600)
    ledger = tmp_path / "evidence_tiny_runs"
    digest = json.loads((ledger / "dense_backbone.json").read_text())["weights_sha256"]
    assert kept.is_file() and weights_digest(kept) == digest
    shutil.rmtree(out)  # a fresh machine: the runs are gone, the ledger and the copy are committed
    res = _cli(*args, "evidence.seeds=[0,1]", timeout=600)
    assert "not trained here" in res.stdout and not (out / "dense").exists()
    assert json.loads((ledger / "evit_seed1.json").read_text())["dense_sha256"] == digest
    state = load_file(str(kept))  # the copy holds other weights: the ledger's are trained again and kept anew
    save_file({k: v + 1 for k, v in state.items()}, str(kept))
    shutil.rmtree(out)
    res = _cli(*args, "evidence.seeds=[0,1,2]", timeout=600)
    assert "not trained here" not in res.stdout and (out / "dense" / "last.safetensors").is_file()
    assert weights_digest(kept) == digest  # same recipe on the same machine: the same weights, kept again


def test_evidence_stopped_while_training_the_dense_backbone_keeps_it_resumable_for_a_fresh_machine(tmp_path):
    """A job stopped (SIGINT) during the dense stage keeps the run's resumable state beside evidence.dense_copy; a
    later session without runs/ continues it from there and ends with the weights of an uninterrupted run."""
    import signal
    import time

    from tpcvit.checkpoint import weights_digest

    def args(root):
        return ["evidence", "-c", "configs/evidence_fmnist49.yaml", "-o", str(root / "ev"), "--out",
                str(root / "evidence_tiny"), *TINY, "data.train_limit=2000", "data.val_limit=64", "train.epochs=4",
                "train.cooldown_epochs=0", "train.batch_size=32", "evidence.methods=[dense]", "evidence.seeds=[0]",
                "evidence.budgets=[0.6]", "evidence.finetune_epochs=1", "evidence.finetune_train_limit=64",
                "evidence.calib_images=16", f"evidence.dense_copy={root / 'kept' / 'dense.safetensors'}"]

    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    _cli(*args(clean), "--quiet", timeout=600)
    proc = subprocess.Popen([sys.executable, "-m", "tpcvit", *args(stopped)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (stopped / "ev" / "dense" / "last.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    partial = stopped / "kept" / "dense.partial.tar"
    assert proc.returncode == 130 and "Traceback" not in err and partial.is_file(), (out + err)[-1500:]
    shutil.rmtree(stopped / "ev")  # a fresh machine: only what is committed is left
    res = _cli(*args(stopped), timeout=600)
    assert "continuing the unfinished run" in res.stdout and not partial.exists()
    epochs = [json.loads(ln)["epoch"] for ln in (stopped / "ev" / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]
    kept = [weights_digest(root / "kept" / "dense.safetensors") for root in (stopped, clean)]
    assert kept[0] == kept[1]  # exactly the weights of the run that was never stopped


def test_an_interrupt_inside_a_progress_bar_still_ends_in_one_line(tmp_path):
    """Ctrl-C while tqdm builds a bar (seen when a job is stopped as an evaluation starts) leaves a half-built bar
    whose finalizer fails at exit; the user sees the one interrupt line, exit 130, no traceback."""
    script = tmp_path / "interrupt.py"
    script.write_text(
        "import sys\n"
        "from tpcvit import cli\n"
        "def run(args):\n"
        "    from tqdm import tqdm\n"
        "    def interrupted(*a, **k):\n"
        "        raise KeyboardInterrupt\n"
        "    tqdm._get_free_pos = interrupted  # inside tqdm's constructor, as a SIGINT can land\n"
        "    tqdm(range(3))\n"
        "cli._run_command = run\n"
        "sys.exit(cli.main(['bench']))\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 130 and "interrupted" in res.stderr and "Traceback" not in res.stderr, res.stderr
