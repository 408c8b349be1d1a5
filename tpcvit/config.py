"""Experiment configuration: YAML files under ``configs/`` plus ``key.sub=value`` command-line overrides.

Every key has a default below; unknown keys, wrong types and out-of-range values are rejected up front with a
message that names the key and the fix, before any output is written.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import TpcvitError

DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "output": "runs/experiment",
    "seed": 0,
    "model": {
        "name": "tpc_deit_small_patch16_224",
        "kwargs": {},  # timm kwargs: img_size, patch_size, in_chans, embed_dim, depth, num_heads, ...
        "tpc": {},  # TPCConfig fields: start_layer, target_keep, smoothing, stabilizer, restart, ...
        "peer": {},  # peer-method kwargs: tome_r (ToMe), keep_rate (EViT), halt_threshold/target_depth (A-ViT)
        "init": None,  # local checkpoint (dense timm or TPC) loaded into the model before training
    },
    "data": {
        "kind": "fashion_mnist",  # fashion_mnist | idx | folder
        "path": None,
        "train_limit": None,  # use a deterministic subset of this many training images
        "val_limit": None,
        "workers": 0,
        "skip_corrupt": True,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "aug": {
            "scale": [0.08, 1.0], "hflip": 0.5, "auto_augment": None, "re_prob": 0.0,
            "color_jitter": None, "interpolation": "bicubic", "crop_pct": 1.0,
        },
        "mixup": 0.0,
        "cutmix": 0.0,
        "label_smoothing": 0.0,
        # dense per-token targets for token labelling (LV-ViT): .npy/.pt, one row per training image, [N] class
        # indices or [N, C] soft labels per patch token; needs position-preserving augmentation (see README)
        "token_labels": None,
        "token_label_weight": 0.5,
    },
    "train": {
        "epochs": 1,  # the cosine schedule's length
        "cooldown_epochs": 0,  # then this many epochs at min_lr (DeiT's recipe: 10), not counted in `epochs`
        "batch_size": 64,
        "lr": 5.0e-4,
        "min_lr": 1.0e-5,
        "weight_decay": 0.05,
        "warmup_epochs": 0,
        "opt": "adamw",
        "clip_grad": None,
        "controller_lr_scale": 10.0,  # controller heads learn faster than the pretrained backbone
        "alpha_budget": 2.0,
        "alpha_dist": 0.1,
        "ckpt_every_steps": 0,  # 0: checkpoint at epoch ends only
        "amp": "none",  # none | bf16 | fp16 (fp16: GPU only)
        "compile": False,
        "log_every_steps": 10,
        "halt_after_steps": None,  # testing: SIGKILL itself after this many steps (simulates kill -9)
    },
    "distill": {
        "teacher": None,  # checkpoint of the dense teacher; null = no distillation
        "teacher_model": None,  # defaults to the student's backbone name without "tpc_"
        "type": "soft",  # soft | hard
        "alpha": 0.5,
        "tau": 1.0,
    },
    "eval": {"batch_size": 128, "mode": "adaptive", "keep": None},
    "pipeline": {  # `tpcvit pipeline`: dense training, then TPC fine-tuning from it with distillation
        "dense_model": None,  # defaults to model.name without "tpc_"
        "dense_epochs": 3,
        "dense_lr": 1.0e-3,
        "tpc_epochs": 2,
        "tpc_lr": 2.0e-4,
        "distill": True,
        "budget_keeps": [],  # extra TPC rows in budget mode at these keep ratios
        # ... once per value K: the controller decides in every K-th controlled block only (ExecutionPolicy
        # decide_every), the same trained weights; 1 = every block. Deciding less often is what makes batch 1 fast
        "budget_decide_every": [1],
        "dense_extra": True,  # also fine-tune the dense model with TPC's recipe: the same total epochs as TPC
        "bench_batch_sizes": [1, 64],
        "bench_rounds": 5,
    },
    "evidence": {  # `tpcvit evidence`: converged dense -> every method fine-tuned alike, seeds, matched GMACs
        "methods": ["tpc", "tpc-uniform", "tpc-adaptive", "idlevit", "dynamicvit", "evit", "tome-ft", "avit", "tome",
                    "tpc-free", "dense", "tpc-norestart", "tpc-nosmooth", "tpc-nostab", "tpc-hybrid"],
        "seeds": [0, 1, 2],
        "budgets": [0.35, 0.45, 0.6],  # GMACs fractions of the dense model, every method evaluated at each
        "train_budget": 0.45,  # static-shape peers fine-tune with the knob that gives this fraction
        "finetune_epochs": 3,
        "finetune_lr": 5.0e-4,
        "finetune_warmup": 0.25,
        "finetune_train_limit": None,
        "finetune_distill": True,
        "calib_images": 256,  # images the knobs are matched on (from the validation loader)
        "flat_gain": 0.3,  # the dense curve counts as flat below this gain (pt) over its last 20% of epochs
        # a converged dense model you already have (e.g. a pretrained DeiT, .safetensors/.pth): every method starts
        # from it and the dense training stage is skipped (its curve is then unknown); null: train it here
        "dense_weights": None,
        # where the dense backbone trained here is kept once trained (outside git): a later session on a fresh machine
        # or another kind of CPU then fine-tunes from the ledger's very weights instead of re-training; null: not kept
        "dense_copy": None,
    },
}

CHOICES = {
    "data.kind": ("fashion_mnist", "idx", "folder"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.opt": ("adamw", "sgd", "lamb", "adam"),
    "distill.type": ("soft", "hard"),
    "eval.mode": ("dense", "adaptive", "budget"),
}
POSITIVE = ("train.epochs", "train.batch_size", "train.lr", "eval.batch_size", "pipeline.dense_epochs",
            "pipeline.tpc_epochs", "pipeline.bench_rounds", "evidence.finetune_epochs", "evidence.finetune_lr",
            "evidence.calib_images", "evidence.train_budget")
FRACTIONS = ("distill.alpha", "data.mixup", "data.cutmix", "data.label_smoothing", "data.aug.re_prob")
# whole numbers: counts of epochs, images, steps, rounds (1.5 epochs has no meaning in the loop)
INTEGERS = ("seed", "train.epochs", "train.cooldown_epochs", "train.batch_size", "eval.batch_size", "data.workers",
            "train.ckpt_every_steps", "train.log_every_steps", "pipeline.dense_epochs", "pipeline.tpc_epochs",
            "pipeline.bench_rounds", "evidence.finetune_epochs", "evidence.calib_images")
NON_NEGATIVE = ("seed", "train.cooldown_epochs", "data.workers", "train.min_lr", "train.weight_decay",
                "train.warmup_epochs", "train.ckpt_every_steps", "train.alpha_budget", "train.alpha_dist",
                "train.controller_lr_scale", "data.token_label_weight", "evidence.finetune_warmup", "distill.tau")
# a subset size: a whole number >= 1, or null for everything
LIMITS = ("data.train_limit", "data.val_limit", "evidence.finetune_train_limit")
FREE_FORM = ("model.kwargs", "model.tpc", "model.peer")  # validated by the model itself


class ConfigError(TpcvitError):
    """A bad configuration value (the message names the key and the fix)."""


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in FREE_FORM:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _merge(base: dict, update: dict, prefix: str = "") -> None:
    valid = _flatten(DEFAULTS)
    for k, v in update.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in FREE_FORM and isinstance(base.get(k), dict):
            _merge(base[k], v, key + ".")
            continue
        if key not in valid and not any(key.startswith(f + ".") for f in FREE_FORM):
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        base[k] = copy.deepcopy(v)


def _nested(dotted: str, value: Any) -> dict:
    out: dict = {}
    _set(out, dotted, value)
    return out


def _update(base: dict, update: dict) -> None:
    """Deep update of a free-form section (its keys are validated by the model)."""
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "2e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults <- YAML file <- overrides, then validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (see configs/ for examples)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        _merge(cfg, loaded)
    for text in overrides or []:
        key, value = parse_override(text)
        inside = next((f for f in FREE_FORM if key.startswith(f + ".")), None)
        if inside is not None:  # model.tpc.target_keep=0.25: that key only, the rest of model.tpc stays
            section = cfg
            for part in inside.split("."):
                section = section.setdefault(part, {})
            _update(section, _nested(key[len(inside) + 1:], value))
            continue
        update: dict = {}
        _set(update, key, value)
        _merge(cfg, update)  # a whole section (model.tpc={...}) replaces it
    validate(cfg)
    return cfg


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(cfg: dict) -> None:
    flat, defaults = _flatten(cfg), _flatten(DEFAULTS)
    for key, value in flat.items():
        default = defaults.get(key)
        if default is None or value is None:
            continue
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        if _number(default) and not _number(value):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if isinstance(default, list) and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list like {default}, got {value!r}")
    for key, options in CHOICES.items():
        if flat[key] not in options:
            raise ConfigError(f"{key} must be one of {list(options)}, got {flat[key]!r}")
    for key in POSITIVE:
        if not flat[key] > 0:
            raise ConfigError(f"{key} must be > 0, got {flat[key]!r}")
    for key in FRACTIONS:
        if not 0 <= flat[key] <= 1:
            raise ConfigError(f"{key} must be in [0, 1], got {flat[key]!r}")
    for key in INTEGERS:
        if float(flat[key]) != int(flat[key]):
            raise ConfigError(f"{key} must be a whole number, got {flat[key]!r}")
        _set(cfg, key, int(flat[key]))
    for key in NON_NEGATIVE:
        if flat[key] is not None and flat[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {flat[key]!r}")
    for key in LIMITS:
        v = flat[key]
        if v is not None and not (_number(v) and v >= 1 and float(v) == int(v)):
            raise ConfigError(f"{key} must be a whole number of images >= 1, or null for all of them; got {v!r}")
    clip = flat["train.clip_grad"]
    if clip is not None and not (_number(clip) and clip > 0):
        raise ConfigError(f"train.clip_grad must be > 0 or null, got {clip!r}")
    if flat["data.token_labels"] is not None:
        aug = cfg["data"]["aug"]
        moved = [k for k, bad in (("data.aug.scale", list(aug["scale"]) != [1.0, 1.0]), ("data.aug.hflip",
                 aug["hflip"] != 0), ("data.aug.auto_augment", aug["auto_augment"] is not None),
                 ("data.mixup", flat["data.mixup"] > 0), ("data.cutmix", flat["data.cutmix"] > 0)) if bad]
        if moved:
            raise ConfigError(f"data.token_labels are per token position, but {', '.join(moved)} move or mix "
                              "pixels: set data.aug.scale=[1,1] data.aug.hflip=0 data.aug.auto_augment=null "
                              "data.mixup=0 data.cutmix=0")
    every = flat["pipeline.budget_decide_every"]
    if not every or not all(_number(k) and k >= 1 and float(k) == int(k) for k in every):
        raise ConfigError(f"pipeline.budget_decide_every must be whole numbers >= 1 (1 = decide in every block), "
                          f"e.g. [1, 5]; got {every!r}")
    _set(cfg, "pipeline.budget_decide_every", [int(k) for k in every])
    keep = flat["eval.keep"]
    if keep is not None and not (_number(keep) and 0 < keep <= 1):
        raise ConfigError(f"eval.keep must be a fraction in (0, 1], got {keep!r}")
    for key in FREE_FORM:
        if not isinstance(flat[key], dict):
            raise ConfigError(f"{key} must be a mapping, got {flat[key]!r}")


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
