"""Nothing wrong silently: bad configs, data, inputs, outputs and environments give one clear error (in-process
checks; the command-line exit codes are in test_pipeline.py)."""

import errno
import gzip
import os

import numpy as np
import pytest
import torch
from conftest import small_tpc
from PIL import Image

from tpcvit import cli, set_mode
from tpcvit.bench import speed_rows
from tpcvit.checkpoint import CheckpointError, OutputError, atomic_write, ensure_writable, load_backbone
from tpcvit.config import ConfigError, load_config
from tpcvit.data import AugmentConfig, DataError, ImageFolderDataset, build_dataset, eval_view, read_idx


# ---------------------------------------------------------------------------------------------- configs
def test_dotted_override_into_a_free_form_section_keeps_the_rest_of_it():
    cfg = load_config("configs/fmnist_main.yaml", ["model.tpc.target_keep=0.25", "model.kwargs.img_size=32"])
    assert cfg["model"]["tpc"] == {"start_layer": 1, "target_keep": 0.25, "paused_keys": True}
    assert cfg["model"]["kwargs"]["patch_size"] == 4 and cfg["model"]["kwargs"]["img_size"] == 32


@pytest.mark.parametrize("override,message", [
    ("train.epochs=1.5", "train.epochs must be a whole number"),
    ("train.warmup_epochs=-1", "train.warmup_epochs must be >= 0"),
    ("data.train_limit=-5", "data.train_limit must be a whole number of images >= 1"),
    ("data.val_limit=0", "data.val_limit must be a whole number of images >= 1"),
    ("data.train_limit=none", "or null for all of them; got 'none'"),
    ("train.clip_grad=0", "train.clip_grad must be > 0 or null"),
    ("data.workers=-2", "data.workers must be >= 0"),
    ("pipeline.budget_decide_every=[0]", "pipeline.budget_decide_every must be whole numbers >= 1"),
    ("pipeline.budget_decide_every=[1,2.5]", "pipeline.budget_decide_every must be whole numbers >= 1"),
    ("pipeline.budget_decide_every=[]", "pipeline.budget_decide_every must be whole numbers >= 1"),
    ("pipeline.budget_decide_every=5", "pipeline.budget_decide_every must be a list"),
])
def test_nonsense_numbers_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/fmnist_main.yaml", [override])


def test_whole_numbers_given_as_floats_become_ints():
    assert load_config(None, ["train.epochs=3.0"])["train"]["epochs"] == 3


# ---------------------------------------------------------------------------------------------- data
def _image_folder(root, classes_train, classes_val, per_class=2):
    rng = np.random.default_rng(0)
    for split, classes in (("train", classes_train), ("val", classes_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_train_and_val_share_one_class_map_and_mismatches_are_refused(tmp_path):
    root = _image_folder(tmp_path / "ok", ["cat", "dog", "eel"], ["cat", "dog", "eel"])
    (root / "val" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    val = build_dataset("folder", str(root), "val", None)
    assert val.classes == ("cat", "dog", "eel") and {lbl for _, lbl in val.samples} == {0, 1, 2}
    missing = _image_folder(tmp_path / "missing", ["cat", "dog", "eel"], ["cat", "eel"])
    with pytest.raises(DataError, match=r"different classes .*missing from val: \['dog'\]"):
        build_dataset("folder", str(missing), "val", None)
    extra = _image_folder(tmp_path / "extra", ["cat", "dog"], ["cat", "dog", "fox"])
    with pytest.raises(DataError, match=r"only in val: \['fox'\]"):
        build_dataset("folder", str(extra), "val", None)


def test_empty_and_single_class_folders_are_refused(tmp_path):
    root = _image_folder(tmp_path / "empty", ["cat", "dog"], ["cat", "dog"])
    (root / "train" / "ghost").mkdir()
    (root / "val" / "ghost").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) \['ghost'\] .* hold no images"):
        build_dataset("folder", str(root), "train", None)
    single = _image_folder(tmp_path / "single", ["cat"], ["cat"])
    with pytest.raises(DataError, match="single class"):
        build_dataset("folder", str(single), "train", None)


def test_truncated_or_non_gzip_idx_files_are_data_errors(tmp_path):
    good = gzip.compress(b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + bytes(4))
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "plain.gz").write_bytes(b"this is not gzip data at all")
    for name in ("cut.gz", "plain.gz"):
        with pytest.raises(DataError, match="truncated or not a valid gzip file"):
            read_idx(tmp_path / name)


def test_decompression_bombs_are_skipped_or_refused(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "d", ["cat", "dog"], ["cat", "dog"])
    Image.fromarray(np.zeros((60, 60, 3), dtype=np.uint8)).save(root / "train" / "cat" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 8x8 images pass; 60x60 is "too many pixels"
    ds = ImageFolderDataset(root / "train", skip_corrupt=True)
    items = [ds[i] for i in range(len(ds))]
    assert sum(x is None for x in items) == 1 and ds.skipped[0].endswith("bomb.png")
    strict = ImageFolderDataset(root / "train", skip_corrupt=False)
    with pytest.raises(DataError, match="bomb.png"):
        [strict[i] for i in range(len(strict))]


def test_token_maps_are_drawn_over_the_crop_the_model_saw():
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 20:40] = 255  # white centre third, black sides
    shown = np.asarray(eval_view(Image.fromarray(wide), 10, AugmentConfig(interpolation="bilinear")))
    assert shown.shape == (10, 10, 3)
    assert shown.mean() > 240  # the model saw the centre square (all white), not the squashed whole image


# ---------------------------------------------------------------------------------------------- models, weights
@pytest.mark.parametrize("mode", ["adaptive", "budget"])
def test_bad_input_tensors_get_a_clear_error(mode):
    model = set_mode(small_tpc().eval(), mode, 0.5 if mode == "budget" else None)
    for bad, message in ((torch.zeros(0, 3, 32, 32), "empty batch"),
                         (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "float32"),
                         (torch.zeros(2, 3, 32, 32, dtype=torch.float64), "float32")):
        with pytest.raises(ValueError, match=message):
            model(bad)


def test_wrong_width_checkpoint_is_not_blamed_on_the_class_count():
    wide, narrow = small_tpc(embed_dim=64), small_tpc(embed_dim=32, num_heads=2)
    with pytest.raises(CheckpointError, match="another model size") as err:
        load_backbone(narrow, wide.state_dict())
    assert "classes" not in str(err.value)
    other_classes = small_tpc(num_classes=7)
    with pytest.raises(CheckpointError, match="5 classes in the checkpoint and 7 in the model"):
        load_backbone(other_classes, wide.state_dict())


# ---------------------------------------------------------------------------------------------- outputs
def test_atomic_files_get_the_mode_other_files_get(tmp_path):
    path = atomic_write(tmp_path / "a.json", lambda t: open(t, "w").write("{}"))
    plain = tmp_path / "b.json"
    plain.write_text("{}")
    assert oct(path.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777)


def test_output_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="a file is in the way"):
        ensure_writable(tmp_path / "file" / "run")


def test_unstable_timings_are_flagged():
    samples = {"dense": [0.415, 0.420, 0.003, 0.418, 0.416], "tpc": [0.20, 0.21, 0.20, 0.22, 0.21]}
    with pytest.warns(UserWarning, match="unstable timings"):  # 5 rounds: no interval, the spread decides
        rows = {r.variant: r for r in speed_rows(samples, {"dense": 1.0, "tpc": 0.5}, 1, "float32", "dense")}
    assert rows["dense"].unstable and not rows["tpc"].unstable
    assert "unstable" in rows["dense"].img_per_s_text
    assert rows["tpc"].speedup_low is None and rows["tpc"].speedup_text == f"{rows['tpc'].speedup:.2f}x"


def test_speedups_are_paired_per_round_with_a_median_interval():
    # the machine drifts 2x over the run (steal time); TPC is exactly 2x dense in every round
    drift = [1.0, 1.1, 1.3, 1.6, 2.0, 1.7, 1.2, 1.0, 1.4, 1.9, 1.5]
    samples = {"dense": [0.4 * d for d in drift], "tpc": [0.2 * d for d in drift]}
    with pytest.warns(UserWarning, match=r"\['dense'\]"):
        rows = {r.variant: r for r in speed_rows(samples, {"dense": 1.0, "tpc": 0.5}, 1, "float32", "dense")}
    tpc = rows["tpc"]
    assert tpc.speedup == pytest.approx(2.0) and tpc.speedup_low == pytest.approx(2.0)
    assert not tpc.unstable and tpc.speedup_text == "2.00x"  # a zero-width interval: just the number
    assert rows["dense"].unstable  # its own time is not pinned down by the rounds (2x drift)
    # one round disturbed for TPC alone: the median and its interval ignore it
    samples["tpc"][3] *= 5
    samples["tpc"][5] *= 1.05
    with pytest.warns(UserWarning):
        tpc = {r.variant: r for r in speed_rows(samples, {"dense": 1.0, "tpc": 0.5}, 1, "float32", "dense")}["tpc"]
    assert tpc.speedup == pytest.approx(2.0) and tpc.speedup_low == pytest.approx(2.0 / 1.05)
    assert tpc.speedup_text == "2.00x [1.90, 2.00]" and not tpc.unstable


@pytest.mark.parametrize("raised,message", [
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/last.safetensors"), "no space left on the device"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "permission denied (/root/x)"),
    (FloatingPointError("loss is nan at step 3: lower train.lr"), "loss is nan at step 3"),
    (KeyboardInterrupt(), "interrupted"),
])
def test_cli_turns_user_caused_errors_into_one_line(monkeypatch, capsys, raised, message):
    def boom(args):
        raise raised

    monkeypatch.setattr(cli, "_cmd_train", boom)
    code = cli.main(["train", "-o", os.devnull])
    err = capsys.readouterr().err
    assert code == (130 if isinstance(raised, KeyboardInterrupt) else 2)
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_lets_programming_errors_surface(monkeypatch):
    def bug(args):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(cli, "_cmd_train", bug)
    with pytest.raises(TypeError):
        cli.main(["train", "-o", os.devnull])


def test_resume_accepts_changed_orchestration_but_not_a_changed_recipe(tmp_path):
    """An evidence job's method list or a pipeline's stages may change between sessions (the run they launched is
    the same run); the recipe of the run itself may not."""
    from tpcvit.config import dump_config
    from tpcvit.engine import check_same_config

    cfg = load_config("configs/evidence_fmnist49.yaml", [])
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    check_same_config(tmp_path, load_config("configs/evidence_fmnist49.yaml",
                                            ["evidence.methods=[tpc,dense]", "pipeline.dense_epochs=9"]))
    with pytest.raises(ConfigError, match="train.lr"):
        check_same_config(tmp_path, load_config("configs/evidence_fmnist49.yaml", ["train.lr=1e-4"]))


def test_compare_reports_tpc_over_each_peer_paired_per_round():
    from tpcvit.compare import compare_markdown, tpc_versus_peers

    drift = [1.0, 1.5, 1.1, 2.0, 1.2, 1.3, 1.0]
    samples = {"dense": [0.30 * d for d in drift], "dense-lean": [0.27 * d for d in drift],
               "tpc@45%/5": [0.24 * d for d in drift],
               "evit@45%": [0.30 * d for d in drift], "tome@35%": [0.20 * d for d in drift]}
    samples["evit@45%"][1] *= 0.8  # EViT's one lucky round
    with pytest.warns(UserWarning):  # dense's own time drifts 2x: flagged
        rows = speed_rows(samples, {"dense": 1.0, "dense-lean": 1.0, "tpc@45%/5": 0.45, "evit@45%": 0.45,
                                    "tome@35%": 0.35}, 1, "float32", "dense")
    points = {"dense": {"method": "dense"}, "dense-lean": {"method": "dense-lean"}, "tpc@45%/5": {"method": "tpc"},
              "evit@45%": {"method": "evit"}, "tome@35%": {"method": "tome"}}
    for label, p in points.items():  # the 35% peer is at another budget: never paired with TPC at 45%
        p.update(target=None if "@" not in label else float(label.split("@")[1][:2]) / 100, knob=None, gmacs=1.0,
                 gmacs_ratio=1.0)
    result = {"speed": [r.__dict__ for r in rows], "points": points, "data": False}
    lean, v = tpc_versus_peers(result)  # dense-lean (the same executor) is paired with TPC at any budget
    assert (lean["peer"], lean["ratio"]) == ("dense-lean", pytest.approx(1.125))
    assert (v["tpc"], v["peer"], v["batch"]) == ("tpc@45%/5", "evit@45%", 1)
    assert v["ratio"] == pytest.approx(1.25) and v["low"] == pytest.approx(1.0) and v["high"] == pytest.approx(1.25)
    text = compare_markdown(result)
    assert "| 1 | tpc@45%/5 | evit@45% | 1.25x [1.00, 1.25] within noise |" in text
    assert "speed-up (b=1) [95% CI]" in text and "1.25x [1.25, 1.25]" not in text
