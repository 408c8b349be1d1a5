"""Building token-reduction models the timm way: size tables, default/pretrained cfgs, dense-weight loading and
the registry's naming (which dense timm model a ``tpc_*`` / peer name is built on)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from ..layers import image_geometry

# name prefixes of the token-reduction variants of a timm model: ``tpc_deit_small_patch16_224`` is TPC on
# ``deit_small_patch16_224``; the peers register ``<method>_deit_<size>_patch16_224``
TPC_PREFIX = "tpc_"
PEER_METHODS = ("tome", "evit", "avit", "idlevit", "dynamicvit")
REDUCER_PREFIXES = (TPC_PREFIX, *(f"{m}_" for m in PEER_METHODS))


def dense_name(name: str) -> str:
    """The dense timm model a registered token-reduction model is built on (the name itself if it is dense)."""
    for prefix in REDUCER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def reducer_method(name: str) -> str | None:
    """``"tpc"``, a peer method (``"avit"``, ...) or ``None`` (a dense model) from a registered model name."""
    for prefix in REDUCER_PREFIXES:
        if name.startswith(prefix):
            return prefix[:-1]
    return None


def variant_name(method: str | None, name: str) -> str:
    """The registered model of ``method`` (``None``: dense, ``"tpc"``, or a peer) on the backbone of ``name``."""
    base = dense_name(name)
    if method is None:
        return base
    if method != "tpc" and method not in PEER_METHODS:
        raise ValueError(f"unknown token-reduction method {method!r}: tpc or one of {PEER_METHODS}")
    return f"{method}_{base}"


DEIT_SIZES = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj", "classifier": "head", **kwargs,
    }


# timm's pretrained-weight arguments: passed on to the dense model when pretrained=True
PRETRAINED_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def build_reducer(cls: type, variant: str, pretrained: bool, kwargs: dict, dense_name: str | None,
                  distilled: bool = False, **init) -> nn.Module:
    """Construct a token-reduction model (TPC or a peer) the timm way.

    ``pretrained=True`` goes through timm's own pretrained machinery for the dense model ``dense_name`` (hub id and
    cache from its ``pretrained_cfg``, ``HF_HUB_OFFLINE``, ``pretrained_cfg_overlay=dict(file=...)`` for a local
    file) and loads its weights into the backbone; what the method adds (controller heads, stabilizers, predictors)
    stays freshly initialised. ``init``: extra constructor arguments (e.g. ``tpc_cfg``).
    """
    if kwargs.pop("features_only", False):
        raise ValueError(f"{variant}: features_only is not supported by token-reduction models")
    pre = {k: kwargs.pop(k) for k in PRETRAINED_KWARGS if k in kwargs}
    model = cls(**init, **kwargs)
    attach_default_cfg(model, variant, distilled)
    if pretrained:
        load_pretrained_dense(model, variant, dense_name, kwargs, pre)
    return model


def load_pretrained_dense(model: nn.Module, variant: str, dense_name: str | None, kwargs: dict, pre: dict) -> None:
    """Load the pretrained weights of the dense timm model ``dense_name`` into ``model``'s backbone."""
    import inspect

    import timm

    from ..checkpoint import load_backbone

    if dense_name is None:
        raise RuntimeError(f"{variant}: timm has no pretrained weights for this backbone; load a local checkpoint "
                           "with tpcvit.load_backbone(model, PATH)")
    base = next(c for c in type(model).__mro__ if c.__module__.startswith("timm."))
    accepted = inspect.signature(base.__init__).parameters
    from ..checkpoint import CheckpointError

    try:
        dense = timm.create_model(dense_name, pretrained=True, **{k: v for k, v in kwargs.items() if k in accepted},
                                  **pre)
    except (OSError, RuntimeError, ValueError) as err:  # hub unreachable, not cached, bad file
        hub = timm.models.get_pretrained_cfg(dense_name)
        where = getattr(hub, "hf_hub_id", None) or dense_name
        first = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{variant}: could not load the pretrained weights of {dense_name} ({where}): {first}. "
                              "Allow the download once (it is then cached), put the weights in the Hugging Face "
                              "cache, or pass pretrained_cfg_overlay=dict(file='weights.safetensors')") from None
    load_backbone(model, dense.state_dict())
    model.pretrained_cfg = model.default_cfg = {**dense.pretrained_cfg, "architecture": variant}


def attach_default_cfg(model: nn.Module, variant: str, distilled: bool = False) -> None:
    model.pretrained_cfg = model.default_cfg = _cfg(
        num_classes=model.num_classes, input_size=image_geometry(model),
        classifier=("head", "head_dist") if distilled else "head", architecture=variant)


_CONVERTED: dict[tuple[type, type], type] = {}


def convert_in_place(model: nn.Module, front: type, prefix: str, setup: Callable[[nn.Module], None]) -> nn.Module:
    """Give a built timm model a method in place (and return it): its class becomes ``front`` in front of its own
    (one class per pair, cached, named ``<prefix><its class>``; ``front`` itself when it already derives from the
    model's class) and ``setup(model)`` adds the method's parts, moved to the model's device and dtype and in the
    model's train/eval mode (its own parts keep theirs: a part frozen in eval mode stays so). Weights and state-dict
    keys stay. What ``tpcvit.patch`` / ``with_tpc`` and ``tpcvit.baselines.as_peer`` share."""
    base = type(model)
    if (front, base) not in _CONVERTED:
        _CONVERTED[(front, base)] = front if issubclass(front, base) else type(
            f"{prefix}{base.__name__}", (front, base),
            {"__module__": __name__, "__doc__": f"{base.__name__} with {prefix} (converted in place)"})
    param = next(model.parameters())
    before = {id(m) for m in model.modules()}
    model.__class__ = _CONVERTED[(front, base)]
    setup(model)
    for m in model.modules():  # the new parts take the model's mode; the model's own keep theirs (a frozen part)
        if id(m) not in before:
            m.training = model.training
    return model.to(device=param.device, dtype=param.dtype)
