"""tpcvit: Token Propagation Controller for Vision Transformers.

``import tpcvit`` registers the TPC models in timm's registry, so ``timm.create_model("tpc_deit_small_patch16_224")``
works, and ``tpcvit.patch(model, keep=0.5)`` gives TPC to a timm ViT you already have (training-free).
See README.md for the CLI and docs/METHOD.md for the method.
"""

from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # must run before timm is imported anywhere

from . import baselines, controller  # noqa: E402  (baselines registers tome_/evit_/avit_ models)
from .checkpoint import CheckpointError, load_backbone, save_weights  # noqa: E402
from .flops import count_gmacs, vit_gmacs_from_trace  # noqa: E402
from .layers import onednn_linears  # noqa: E402
from .models import TPCVisionTransformer, TPCVisionTransformerDistilled  # noqa: E402
from .patch import calibrate_threshold, patch, with_tpc  # noqa: E402
from .policy import MODES, ExecutionPolicy  # noqa: E402
from .propagation import TokenTrace, TPCConfig, tpc_loss  # noqa: E402
from .runtime import calibrate_keep_profile, override_probs, set_mode, set_policy  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "MODES", "CheckpointError", "ExecutionPolicy", "TPCConfig", "TPCVisionTransformer",
    "TPCVisionTransformerDistilled", "TokenTrace", "baselines", "calibrate_keep_profile", "calibrate_threshold",
    "controller", "count_gmacs",
    "load_backbone", "onednn_linears", "override_probs", "patch", "save_weights", "set_mode", "set_policy", "tpc_loss",
    "vit_gmacs_from_trace", "with_tpc",
]
