"""Import guard for torchvision wheels whose C++ ops cannot load.

The pinned ``torchvision==0.28.0`` wheel is a CUDA build. On a CPU-only ``torch`` its ``_C`` extension
fails to load, and ``torchvision/_meta_registrations.py`` then crashes at import with
``RuntimeError: operator torchvision::nms does not exist`` because it registers fake kernels for ops whose
schemas were never defined. ``import timm`` imports torchvision, so timm breaks too.

:func:`ensure_torchvision_importable` tries the normal import first and does nothing when it works. Only when
it fails with exactly that error does it define the two missing op schemas (``nms`` and ``qnms``; the other
registrations are already guarded by ``torchvision.extension._has_ops()``) and import again. Detection and
box ops stay unavailable (they would raise torchvision's own "Couldn't load custom C++ ops" error), which is
fine for this project: it uses only datasets and transforms.
"""

from __future__ import annotations

import sys

_MISSING_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library_handle = None  # keeps the schema definitions alive for the process lifetime
guard_applied = False


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` (and so ``import timm``) work on a CPU-only torch."""
    global _library_handle, guard_applied
    import torch

    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    # drop the half-imported modules, define the schemas, import again
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _library_handle = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_OP_SCHEMAS:
        _library_handle.define(schema)
    import torchvision  # noqa: F401,F811

    guard_applied = True
