"""Peer token-reduction methods in the same harness as TPC, each on timm's ViT with one budget knob.

``import tpcvit`` registers ``tome_deit_*``, ``evit_deit_*``, ``avit_deit_*``, ``idlevit_deit_*`` and
``dynamicvit_deit_*`` in timm's registry.
"""

from .avit import AViTVisionTransformer
from .common import PEER_METHODS, PeerMixin, PeerTrace, peer_modules
from .dynamicvit import DynamicViTVisionTransformer
from .evit import EViTVisionTransformer
from .idlevit import IdleViTVisionTransformer
from .tome import ToMeVisionTransformer

__all__ = ["PEER_METHODS", "AViTVisionTransformer", "DynamicViTVisionTransformer",
           "EViTVisionTransformer", "IdleViTVisionTransformer", "PeerMixin", "PeerTrace", "ToMeVisionTransformer",
           "peer_modules"]
