"""Training and evaluation harness (DeiT-style, flat): build, train one epoch, evaluate, fit with resume.

Checkpoints are folders ``<output>/checkpoints/step_NNNNNNN/`` (weights in safetensors, optimizer/RNG state,
meta JSON) written under a temporary name and renamed; ``<output>/last.json`` (atomically replaced) points at
the newest complete one. ``--resume`` restores model, optimizer, scaler, RNG states and the position inside the
epoch, and trims log lines written after that checkpoint, so a run killed with ``kill -9`` continues exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .baselines.common import PEER_METHODS
from .checkpoint import CheckpointError, OutputError, atomic_write, ensure_writable, load_backbone, save_weights, unwrap
from .config import ConfigError, dump_config
from .data import (
    AugmentConfig,
    DataError,
    ResumableSampler,
    SeedPerSample,
    WithTokenLabels,
    build_dataset,
    build_loader,
    build_transform,
    load_token_labels,
)
from .flops import count_gmacs
from .models import dense_name, image_geometry, reducer_method
from .models.lvvit import token_labeling_loss
from .reducer import reducers
from .runtime import set_mode, tpc_modules


# ----------------------------------------------------------------------------------------------------------
# distributed
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Initialise ``torch.distributed`` when launched by ``torchrun`` (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return DistInfo(rank, world, local, dev)
    return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))


def _all_reduce(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        dist.all_reduce(t)
    return t


def ranks_in_sync(model: nn.Module, info: DistInfo) -> bool:
    """True when every rank holds bit-identical parameters (compares a per-rank fingerprint)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder(97)
        fingerprint = torch.stack([flat.sum(), (flat * weights).sum()])
    gathered = [torch.zeros_like(fingerprint) for _ in range(info.world)]
    dist.all_gather(gathered, fingerprint)
    return all(torch.equal(g, gathered[0]) for g in gathered)


# ----------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count_blocks(model: nn.Module) -> int:
    """Transformer blocks of a ViT, or of every stage of a Swin (TPC or plain timm)."""
    if hasattr(model, "layers") and not hasattr(model, "blocks"):
        return sum(len(stage.blocks) for stage in model.layers)
    return len(getattr(model, "blocks", ()))


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


def build_model(cfg: dict, num_classes: int, name: str | None = None, init: str | None = None) -> nn.Module:
    """timm model from ``cfg["model"]`` (TPC options only for ``tpc_*`` models), optionally initialised."""
    import timm

    name = name or cfg["model"]["name"]
    kwargs = dict(cfg["model"]["kwargs"], num_classes=num_classes)
    method = reducer_method(name)
    options: dict = {}  # the method's own: TPCConfig fields, or a peer's knobs
    if method == "tpc":
        options = dict(cfg["model"]["tpc"])
    elif method is not None:
        options = cfg["model"]["peer"]
        if set(options) & set(PEER_METHODS):  # per-method sections: {evit: {keep_rate: 0.5}, avit: {...}}
            options = options.get(method, {})
    try:
        if method is None or timm.is_model(name) or not timm.is_model(dense_name(name)):
            model = timm.create_model(name, **kwargs, **options)
        else:  # TPC or a peer on a timm ViT it is not registered for (DINOv2, CLIP, ...): the dense model, given it
            from .baselines import as_peer
            from .patch import with_tpc
            from .propagation import TPCConfig

            dense = timm.create_model(dense_name(name), **kwargs)
            model = (with_tpc(dense, TPCConfig.pop_from(options)) if method == "tpc"
                     else as_peer(dense, method, **options))
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"unknown model {name!r}: a timm model name, or tpc_ / a peer's prefix before one "
                              "(see timm.list_models('*vit*'))") from err
        raise
    except (TypeError, ValueError) as err:  # unknown or out-of-range model options, a backbone a peer cannot run
        raise ConfigError(f"bad model.kwargs / model.tpc / model.peer for {name}: {_first_line(err)}") from err
    if init:
        load_backbone(model, init)
    return model


class DistillationLoss(nn.Module):
    """DeiT-style distillation from a frozen dense teacher.

    ``soft``: ``(1 - alpha) CE(student, y) + alpha * tau^2 KL(softmax(t / tau) || softmax(s / tau))``.
    ``hard``: ``(1 - alpha) CE(student, y) + alpha CE(student_dist, argmax teacher)``. A distilled student
    (class + distillation token) uses its distillation head for the teacher term.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module | None, kind: str, alpha: float, tau: float) -> None:
        super().__init__()
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau

    def forward(self, images: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        cls_out, dist_out = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        loss = self.base(cls_out, targets)
        if self.teacher is None:
            return loss if not isinstance(outputs, tuple) else (loss + self.base(dist_out, targets)) / 2
        with torch.no_grad():
            t = self.teacher(images).float()
        if self.kind == "soft":
            T = self.tau
            kd = F.kl_div(F.log_softmax(dist_out.float() / T, -1), F.log_softmax(t / T, -1),
                          reduction="batchmean", log_target=True) * T * T
        else:
            kd = F.cross_entropy(dist_out.float(), t.argmax(-1))
        return (1 - self.alpha) * loss + self.alpha * kd


def build_criterion(cfg: dict, num_classes: int, teacher: nn.Module | None) -> tuple[nn.Module, object]:
    """Task loss (label smoothing / mixup-cutmix targets from timm) wrapped in distillation; and the mixup fn."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    d = cfg["data"]
    mixup = None
    if d["mixup"] > 0 or d["cutmix"] > 0:
        mixup = Mixup(mixup_alpha=d["mixup"], cutmix_alpha=d["cutmix"], label_smoothing=d["label_smoothing"],
                      num_classes=num_classes)
        base: nn.Module = SoftTargetCrossEntropy()
    elif d["label_smoothing"] > 0:
        base = LabelSmoothingCrossEntropy(d["label_smoothing"])
    else:
        base = nn.CrossEntropyLoss()
    k = cfg["distill"]
    return DistillationLoss(base, teacher, k["type"], k["alpha"], k["tau"]), mixup


def build_teacher(cfg: dict, num_classes: int, device: torch.device) -> nn.Module | None:
    path = cfg["distill"]["teacher"]
    if not path:
        return None
    name = cfg["distill"]["teacher_model"] or dense_name(cfg["model"]["name"])
    teacher = build_model(cfg, num_classes, name=name, init=path).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def build_optimizer(model: nn.Module, cfg: dict):
    """timm optimizer; no weight decay on norms/biases/tokens; TPC heads at ``controller_lr_scale`` x lr."""
    from timm.optim import create_optimizer_v2

    t = cfg["train"]
    added_ids = {id(p) for m in reducers(model) for p in m.reduction_parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "dist_token"))
        groups.setdefault((id(p) in added_ids, no_decay), []).append(p)
    param_groups = [{"params": ps, "weight_decay": 0.0 if nd else t["weight_decay"],
                     "lr_scale": t["controller_lr_scale"] if added else 1.0}
                    for (added, nd), ps in groups.items()]
    return create_optimizer_v2(param_groups, opt=t["opt"], lr=t["lr"], weight_decay=t["weight_decay"])


def total_epochs(train_cfg: dict) -> int:
    """Epochs a run trains: the cosine schedule's ``epochs`` plus ``cooldown_epochs`` at ``min_lr``."""
    return train_cfg["epochs"] + train_cfg.get("cooldown_epochs", 0)


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up then cosine decay, a pure function of the global step (resume needs no scheduler state)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast(amp: str, device: torch.device):
    if amp == "none":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a GPU; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, info: DistInfo | None = None, amp: str = "none",
             progress: bool = True, desc: str = "eval") -> dict:
    """Top-1/top-5/loss, per-block keep ratio and mean GMACs per image (work actually done), all ranks summed."""
    info = info or DistInfo(device=device)
    model.eval()
    inner = unwrap(model)
    is_reducer = bool(reducers(inner))
    depth = count_blocks(inner)
    sums = torch.zeros(5 + depth, dtype=torch.float64)  # n, top1, top5, loss, gmacs, keep per block
    dense_gmacs = None
    for images, targets in tqdm(loader, desc=desc, disable=not (progress and info.main), leave=False):
        images, targets = images.to(device), targets.to(device)
        with autocast(amp, device):
            if is_reducer:
                logits, trace = inner.forward_with_trace(images)
            else:
                logits, trace = inner(images), None
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct = top == targets[:, None]
        sums[0] += len(targets)
        sums[1] += correct[:, 0].sum().item()
        sums[2] += correct.any(dim=1).sum().item()
        sums[3] += F.cross_entropy(logits, targets, reduction="sum").item()
        if trace is not None:
            sums[4] += inner.gmacs_per_image(trace).sum().item()
            sums[5:] += trace.keep_per_image().sum(dim=0).double().cpu()
        else:
            if dense_gmacs is None:
                dense_gmacs = count_gmacs(inner, images[:1])
            sums[4] += dense_gmacs * len(targets)
            sums[5:] += len(targets)
    sums = _all_reduce(sums, info)
    n = max(sums[0].item(), 1)
    return {"top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n, "loss": sums[3].item() / n,
            "gmacs": sums[4].item() / n, "keep_per_block": [round(v / n, 4) for v in sums[5:].tolist()],
            "images": int(sums[0].item())}


# ----------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    """Every RNG state as tensors and plain numbers, so ``torch.load(weights_only=True)`` can read it back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, model, optimizer, scaler, position: dict, best: float, info: DistInfo) -> Path:
    """Write a complete checkpoint folder, then point ``last.json`` at it; keep only the newest two.

    Every rank's RNG state is gathered into it (ranks draw different augmentation and Gumbel noise), so a resumed
    DDP run continues each rank's stream exactly."""
    rng = _rng_state()
    ranks = [rng]
    if info.world > 1:
        ranks = [None] * info.world if info.main else None
        dist.gather_object(rng, ranks, dst=0)
    if not info.main:
        return out
    ckdir = out / "checkpoints"
    final = ckdir / f"step_{position['global_step']:07d}"
    tmp = ckdir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / "model.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "rng": rng, "rng_ranks": ranks}, tmp / "train_state.pt")
    (tmp / "meta.json").write_text(json.dumps({**position, "best_top1": best}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(out / "last.json", lambda t: Path(t).write_text(json.dumps(
        {"checkpoint": str(final.relative_to(out)), **position, "best_top1": best})))
    shutil.copyfile(final / "model.safetensors", out / ".last.safetensors.tmp")
    os.replace(out / ".last.safetensors.tmp", out / "last.safetensors")
    for old in sorted(p for p in ckdir.glob("step_*") if p != final)[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _trim_jsonl(path: Path, max_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["global_step"] <= max_step]
    atomic_write(path, lambda t: Path(t).write_text("".join(ln + "\n" for ln in keep)))


# keys that may change between a run and its resumption (they do not change what is computed)
# keys a resumed run may change: where it writes, logging/checkpoint cadence, and the sections that orchestrate runs
# rather than define one (an evidence job's method list, a pipeline's stages)
# train.cooldown_epochs too: epochs at min_lr appended after the cosine schedule leave every step before them as it
# was (lr_at is min_lr past the schedule), so a finished run can be extended by a cooldown and stays exact
RESUME_MAY_CHANGE = ("output", "train.halt_after_steps", "train.log_every_steps", "train.ckpt_every_steps",
                     "train.cooldown_epochs", "evidence.", "pipeline.")


def check_same_config(out: Path, cfg: dict) -> None:
    """Refuse to resume a run with a config that would train something else (one line naming the keys)."""
    import yaml

    from .config import _flatten

    saved_path = out / "config.yaml"
    if not saved_path.exists():
        return
    saved, now = _flatten(yaml.safe_load(saved_path.read_text()) or {}), _flatten(cfg)
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
               and not k.startswith(RESUME_MAY_CHANGE)]
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise ConfigError(f"--resume with another config than the run in {out} ({shown}"
                          f"{', ...' if len(changed) > 4 else ''}): resume with the same settings, or start a new "
                          "run in another --output")


def load_resume(out: Path, model, optimizer, scaler, rank: int = 0) -> dict | None:
    pointer = out / "last.json"
    if not pointer.exists():
        return None
    meta = json.loads(pointer.read_text())
    ck = out / meta["checkpoint"]
    load_backbone(model, ck / "model.safetensors")
    try:  # weights_only: tensors and plain data only, so a run folder someone hands you cannot run code
        state = torch.load(ck / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unpickling failure: refuse the folder, name the file)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"refusing to resume from {ck / 'train_state.pt'}: it is not a plain tensor/data "
                              f"file ({first}). Start a fresh run in a new --output folder.") from None
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    ranks = state.get("rng_ranks") or [state["rng"]]
    if rank >= len(ranks):
        raise CheckpointError(f"{ck} was written by {len(ranks)} process(es); resume with the same number "
                              f"(torchrun --nproc_per_node {len(ranks)})")
    _set_rng_state(ranks[rank])
    for name in ("steps.jsonl", "metrics.jsonl"):
        _trim_jsonl(out / name, meta["global_step"])
    return meta


def _append_jsonl(path: Path, record: dict, info: DistInfo) -> None:
    if info.main:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


# ----------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------
def config_geometry(cfg: dict, name: str | None = None) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images the configured model takes (from a throwaway instance)."""
    return image_geometry(build_model(cfg, 1, name=name))


def build_val_data(cfg: dict, in_chans: int, img_size: int, info: DistInfo):
    """The validation dataset and loader only (evaluation, analysis, calibration): the training images are never
    read; a folder dataset's class map comes from the names of ``train/``'s class folders."""
    d = cfg["data"]
    aug = AugmentConfig(**{**d["aug"], "scale": tuple(d["aug"]["scale"])})
    val_tf = build_transform(img_size, in_chans, False, aug, d["mean"], d["std"])
    val_split = "val" if d["kind"] == "folder" else "test"
    val_ds = build_dataset(d["kind"], d["path"], val_split, val_tf, d["val_limit"], d["skip_corrupt"])
    val_sampler = ResumableSampler(len(val_ds), False, 0, info.rank, info.world, pad=False)
    return val_ds, build_loader(val_ds, cfg["eval"]["batch_size"], val_sampler, d["workers"], drop_last=False)


def build_eval(cfg: dict, checkpoint: str | None = None, name: str | None = None, info: DistInfo | None = None):
    """``(model, val_loader, info, val_ds)`` for evaluating/analysing a trained model, without the training set
    (class count from the validation data, which shares the training class map)."""
    info = info or init_distributed()
    c, h, _ = config_geometry(cfg, name)
    val_ds, val_loader = build_val_data(cfg, c, h, info)
    model = build_model(cfg, val_ds.num_classes, name=name, init=checkpoint).to(info.device)
    return model, val_loader, info, val_ds


def build_data(cfg: dict, in_chans: int, img_size: int, info: DistInfo):
    """Train/val datasets, samplers and loaders for a model taking ``in_chans`` x ``img_size``^2 images."""
    d = cfg["data"]
    aug = AugmentConfig(**{**d["aug"], "scale": tuple(d["aug"]["scale"])})
    train_tf = build_transform(img_size, in_chans, True, aug, d["mean"], d["std"])
    train_ds = build_dataset(d["kind"], d["path"], "train", train_tf, d["train_limit"], d["skip_corrupt"])
    if d["token_labels"]:
        train_ds = WithTokenLabels(train_ds, load_token_labels(d["token_labels"], len(train_ds), train_ds.num_classes))
    if d["workers"] > 0:  # augmentation independent of which worker draws a sample: exact resume with workers
        train_ds = SeedPerSample(train_ds, cfg["seed"])
    val_ds, val_loader = build_val_data(cfg, in_chans, img_size, info)
    bs = cfg["train"]["batch_size"]
    if len(train_ds) < bs * info.world:
        raise DataError(f"only {len(train_ds)} training images for batch size {bs} x {info.world} processes: "
                        "lower train.batch_size or add data")
    train_sampler = ResumableSampler(len(train_ds), True, cfg["seed"], info.rank, info.world, drop_last=True)
    train_loader = build_loader(train_ds, bs, train_sampler, d["workers"], drop_last=True)
    return train_ds, val_ds, train_sampler, train_loader, val_loader


@dataclass
class Training:
    """Everything one training run holds between steps (built by :func:`_prepare_training`)."""

    cfg: dict
    out: Path
    info: DistInfo
    model: nn.Module
    forward: nn.Module  # what the batches go through: the model, its DDP wrapper, or torch.compile of it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    mixup: object | None
    train_ds: object
    val_ds: object
    train_sampler: ResumableSampler
    train_loader: object
    val_loader: object
    steps_per_epoch: int
    total_steps: int
    warmup: int
    is_reducer: bool  # TPC or a peer method: trains with its trace and its own loss
    token_labels: bool
    distilled_student: bool
    position: dict
    best: float


def _prepare_training(cfg: dict, resume: bool, model_name: str | None, init: str | None) -> Training:
    """Build model, data, optimizer and loss (failing on bad input before anything is written), then resume or
    start the output folder."""
    info = init_distributed()
    device = info.device
    out = Path(cfg["output"])
    t = cfg["train"]
    seed_everything(cfg["seed"] + info.rank)
    in_chans, img_size, _ = config_geometry(cfg, model_name)
    train_ds, val_ds, train_sampler, train_loader, val_loader = build_data(cfg, in_chans, img_size, info)
    num_classes = train_ds.num_classes
    model = build_model(cfg, num_classes, name=model_name, init=init or cfg["model"]["init"]).to(device)
    if tpc_modules(model):
        set_mode(model, "adaptive")
    teacher = build_teacher(cfg, num_classes, device)
    token_labels = bool(cfg["data"]["token_labels"])
    if token_labels and not hasattr(model, "forward_head_tokens"):
        raise ConfigError(f"data.token_labels need a model with a token-labelling head (lvvit_*, tpc_lvvit_*), "
                          f"not {cfg['model']['name']}")
    if token_labels and teacher is not None:
        raise ConfigError("token labelling and distillation are alternatives: set distill.teacher=null")
    distilled_student = hasattr(model, "set_distilled_training") and teacher is not None
    if distilled_student:
        model.set_distilled_training(True)
    criterion, mixup = build_criterion(cfg, num_classes, teacher)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if t["amp"] == "fp16" else None
    steps_per_epoch = len(train_sampler) // t["batch_size"]

    if info.main:
        ensure_writable(out)  # before any compute
    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    best = -1.0
    if resume:
        check_same_config(out, cfg)
        meta = load_resume(out, model, optimizer, scaler, info.rank)
        if meta is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {out} (last.json missing); start without --resume")
        position = {k: meta[k] for k in position}
        best = meta["best_top1"]
    elif info.main:
        if (out / "last.json").exists():
            raise OutputError(f"{out} already holds a run: pass --resume to continue it or choose another output")
        for stale in ("steps.jsonl", "metrics.jsonl"):  # a run that died before its first checkpoint: start over
            (out / stale).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.yaml", lambda p: Path(p).write_text(dump_config(cfg)))

    train_model = model
    if info.world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    forward = torch.compile(train_model) if t["compile"] else train_model
    return Training(cfg, out, info, model, forward, optimizer, scaler, criterion, mixup, train_ds, val_ds,
                    train_sampler, train_loader, val_loader, steps_per_epoch, steps_per_epoch * t["epochs"],
                    int(t["warmup_epochs"] * steps_per_epoch), bool(reducers(model)), token_labels, distilled_student,
                    position, best)


def _train_step(run: Training, images: torch.Tensor, targets, step: int) -> dict:
    """One optimisation step at global ``step``; returns its log record (and the trace's keep ratio)."""
    t, device = run.cfg["train"], run.info.device
    for g in run.optimizer.param_groups:
        g["lr"] = lr_at(step, run.total_steps, run.warmup, t["lr"], t["min_lr"]) * g.get("lr_scale", 1.0)
    token_targets = None
    if run.token_labels:
        targets, token_targets = targets
        token_targets = token_targets.to(device)
    images, targets = images.to(device), targets.to(device)
    labels = targets
    if run.mixup is not None:
        images, labels = run.mixup(images, targets)
    with autocast(t["amp"], device):
        head = {"token_logits": True} if run.token_labels else {}  # (class, per-token) logits to train on
        if run.is_reducer:
            outputs, trace = run.forward(images, return_trace=True, **head)
            reg = unwrap(run.model).reduction_loss(trace, t)
        else:
            outputs, reg = run.forward(images, **head), None
        if run.token_labels:
            loss = token_labeling_loss(*outputs, labels, token_targets, run.cfg["data"]["token_label_weight"])
        else:
            loss = run.criterion(images, outputs, labels)
        total = loss + reg["total"] if reg else loss
    if not torch.isfinite(total):
        raise FloatingPointError(f"loss is {total.item()} at step {step}: lower train.lr or enable clip_grad")
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler:
        run.scaler.scale(total).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        total.backward()
    if t["clip_grad"]:
        nn.utils.clip_grad_norm_(run.model.parameters(), t["clip_grad"])
    (run.scaler.step(run.optimizer), run.scaler.update()) if run.scaler else run.optimizer.step()
    rec = {"global_step": step + 1, "epoch": step // run.steps_per_epoch, "loss": round(loss.item(), 6),
           "lr": run.optimizer.param_groups[0]["lr"]}
    if reg:
        inner = unwrap(run.model)
        start = inner.tpc_cfg.start_layer if hasattr(inner, "tpc_cfg") else 0
        rec.update({k: round(v.item(), 6) for k, v in reg.items() if k != "total"},
                   keep=round(trace.keep_ratio()[start:].mean().item(), 4))
    return rec


def _train_epoch(run: Training, epoch: int, progress: bool) -> tuple[int, float]:
    """The steps of ``epoch`` (from where a resumed run stopped); returns images seen and seconds."""
    t, info = run.cfg["train"], run.info
    start = run.position["step_in_epoch"] if epoch == run.position["epoch"] else 0
    run.train_sampler.set_epoch(epoch, start * t["batch_size"])
    if isinstance(run.train_ds, SeedPerSample):
        run.train_ds.set_epoch(epoch)
    run.model.train()
    bar = tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{total_epochs(t)}", disable=not (progress and info.main),
               initial=start, total=run.steps_per_epoch, leave=False)
    t0, seen = time.perf_counter(), 0
    for i, (images, targets) in enumerate(bar, start=start):
        rec = _train_step(run, images, targets, epoch * run.steps_per_epoch + i)
        seen += len(images)
        gstep = rec["global_step"]
        if gstep % t["log_every_steps"] == 0:
            _append_jsonl(run.out / "steps.jsonl", rec, info)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", **({"keep": rec["keep"]} if "keep" in rec else {}))
        run.position = {"epoch": epoch, "step_in_epoch": i + 1, "global_step": gstep}
        if t["ckpt_every_steps"] and gstep % t["ckpt_every_steps"] == 0 and i + 1 < run.steps_per_epoch:
            save_checkpoint(run.out, run.model, run.optimizer, run.scaler, run.position, run.best, info)
        _after_step(run.cfg, gstep)
    return seen, time.perf_counter() - t0


def _after_step(cfg: dict, gstep: int) -> None:
    """``train.halt_after_steps`` (tests of exact resume): die like ``kill -9`` after that many steps."""
    halt = cfg["train"]["halt_after_steps"]
    if halt and gstep >= halt:
        os.kill(os.getpid(), signal.SIGKILL)


def _end_epoch(run: Training, epoch: int, seen: int, seconds: float, progress: bool) -> dict:
    """Evaluate, log, keep the best weights and checkpoint at the end of ``epoch``."""
    info = run.info
    metrics = evaluate(run.model, run.val_loader, info.device, info, run.cfg["train"]["amp"], progress,
                       desc=f"eval {epoch + 1}")
    run.position = {"epoch": epoch + 1, "step_in_epoch": 0, "global_step": (epoch + 1) * run.steps_per_epoch}
    summary = {"global_step": run.position["global_step"], "epoch": epoch + 1, **metrics,
               "train_img_per_s": round(seen * info.world / max(seconds, 1e-9), 2)}
    _append_jsonl(run.out / "metrics.jsonl", summary, info)
    if metrics["top1"] > run.best:
        run.best = metrics["top1"]
        if info.main:
            save_weights(run.model, run.out / "best.safetensors")
    save_checkpoint(run.out, run.model, run.optimizer, run.scaler, run.position, run.best, info)
    if info.main and progress:
        keep = f" keep {np.mean(metrics['keep_per_block']):.2f}" if run.is_reducer else ""
        print(f"epoch {epoch + 1}: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} "
              f"GMACs {metrics['gmacs']:.4f}{keep}", flush=True)
    return summary


def fit(cfg: dict, resume: bool = False, progress: bool = True, model_name: str | None = None,
        init: str | None = None) -> dict:
    """Train ``cfg`` (dense, TPC or a peer) and evaluate every epoch; returns the final summary.

    Writes ``config.yaml``, ``metrics.jsonl`` (per epoch), ``steps.jsonl`` (per logged step), ``best.safetensors``,
    ``last.safetensors`` and resumable checkpoints under ``cfg["output"]``.
    """
    run = _prepare_training(cfg, resume, model_name, init)
    summary: dict = {}
    for epoch in range(run.position["epoch"], total_epochs(cfg["train"])):
        seen, seconds = _train_epoch(run, epoch, progress)
        summary = _end_epoch(run, epoch, seen, seconds, progress)
    if run.distilled_student:
        run.model.set_distilled_training(False)
    info = run.info
    if info.world > 1:
        summary["ranks_in_sync"] = ranks_in_sync(run.model, info)
    summary["world_size"] = info.world
    summary["best_top1"] = run.best
    skipped = sorted(set(getattr(run.train_ds, "skipped", [])) | set(getattr(run.val_ds, "skipped", [])))
    summary["skipped_images"] = len(skipped)
    if skipped:
        summary["skipped_files"] = skipped[:50]
        if info.main and progress:
            print(f"skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:5])}"
                  f"{' ...' if len(skipped) > 5 else ''}", flush=True)
    return summary
