"""Peer token-reduction methods in the same harness as TPC, each on timm's ViT with one budget knob.

``import tpcvit`` registers ``tome_deit_*``, ``evit_deit_*`` and ``avit_deit_*`` in timm's registry.
"""

from .avit import AViTVisionTransformer
from .common import PeerMixin, PeerTrace, peer_modules
from .evit import EViTVisionTransformer
from .tome import ToMeVisionTransformer

__all__ = ["AViTVisionTransformer", "EViTVisionTransformer", "PeerMixin", "PeerTrace", "ToMeVisionTransformer",
           "peer_modules"]
