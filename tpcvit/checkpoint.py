"""Weights in and out: local checkpoints only (no hub), written atomically, loaded with clear errors."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .errors import TpcvitError
from .layers.geometry import unwrap


def added_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the modules a token-reduction method adds to its backbone (its ``added_modules``:
    TPC's controller and stabilizers, A-ViT's halting head, DynamicViT's predictors): absent from dense weights."""
    return tuple(f"{name}." for name in getattr(model, "added_modules", ()))


class CheckpointError(TpcvitError):
    """A checkpoint that cannot be used for this model (message says why and how to fix it)."""


class OutputError(TpcvitError):
    """An output location that cannot be written (checked before any compute)."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it, before any compute is spent."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test.", delete=True)
        probe.close()
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"cannot write to {folder}: a file is in the way (part of the path is not a folder); "
                          "choose another output path") from None
    except PermissionError:
        raise OutputError(f"cannot write to {folder}: permission denied; choose an output folder you can "
                          "write to") from None
    except OSError as err:
        raise OutputError(f"cannot write to {folder}: {err.strerror or err}") from None
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model``'s state dict as safetensors, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp))


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 over a checkpoint's tensors (names, dtypes, shapes, values, in name order): the identity of a model's
    weights, whatever the file format. Two trainings from one recipe give the same digest only where they really
    computed the same (same CPU kind and libraries)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(read_state_dict(path).items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read weights from ``.safetensors`` or a torch file (``.pth``/``.pt``/``.bin``, optionally nested under
    ``model``/``state_dict``), stripping DDP's ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (give the path to a .safetensors or .pth file)")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt / truncated / not a checkpoint
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}. "
                              "Is the file complete and a safetensors/torch state dict?") from err
    for key in ("model_ema", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def load_backbone(model: nn.Module, source: str | os.PathLike | dict, strict: bool = True) -> nn.Module:
    """Load dense (timm/DeiT) or full TPC weights into ``model``.

    Backbone keys must all be present and of the right shape; controller/stabilizer keys are loaded when the
    checkpoint has them (a TPC checkpoint) and otherwise keep their near-dense initialisation. A position
    embedding for another token grid is resampled, and so is a patch embedding for another patch size (FlexiViT's
    pseudo-inverse resize, as timm does for its own checkpoints): a backbone trained at one token count starts
    another, like DeiT at 224 fine-tuned to 384. Mismatches raise :class:`CheckpointError` naming the keys.
    """
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    target = unwrap(model)
    state = read_state_dict(source) if not isinstance(source, dict) else dict(source)
    own = target.state_dict()
    name = getattr(target, "pretrained_cfg", {}).get("architecture", type(target).__name__)
    backbone = [k for k in own if not k.startswith(added_prefixes(target))]
    missing = [k for k in backbone if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint does not fit {name}: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}. It is probably for another architecture "
            "(check model name, depth, embed_dim, distilled or not).")
    num_prefix = getattr(target, "num_prefix_tokens", 1)
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        grid = tuple(target.patch_embed.grid_size)
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=grid, num_prefix_tokens=num_prefix)
    key = "patch_embed.proj.weight"
    if key in state and key in own and state[key].ndim == 4 and state[key].shape[:2] == own[key].shape[:2] \
            and state[key].shape[2:] != own[key].shape[2:]:  # same width and channels, another patch size
        state[key] = resample_patch_embed(state[key], list(own[key].shape[2:]))
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        # only the classifier's output size differs: a class-count mismatch; anything else: another width/size
        classes = [w for w in wrong if w[0].startswith("head") and w[1][0] != w[2][0] and w[1][1:] == w[2][1:]]
        if classes and len(classes) == len(wrong):
            hint = (f" The classifier has {classes[0][1][0]} classes in the checkpoint and {classes[0][2][0]} in the "
                    "model: create the model with num_classes matching the checkpoint, or drop the head keys to "
                    "fine-tune on new classes.")
        else:
            hint = " The checkpoint is for another model size (embed_dim, depth, patch or MLP width differ)."
        raise CheckpointError(f"checkpoint does not fit {name}: shape mismatch {wrong[:3]}.{hint}")
    target.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model
