"""Peer token-reduction methods in the same harness as TPC, each on timm's ViT with one budget knob.

``import tpcvit`` registers ``tome_deit_*``, ``evit_deit_*``, ``avit_deit_*``, ``idlevit_deit_*`` and
``dynamicvit_deit_*`` in timm's registry; :func:`as_peer` gives any of them to a timm ViT the user already has.
"""

from .avit import AViTEva, AViTVisionTransformer
from .common import PEER_METHODS, PeerMixin, PeerTrace, as_peer, peer_modules
from .dynamicvit import DynamicViTEva, DynamicViTVisionTransformer
from .evit import EViTEva, EViTVisionTransformer
from .idlevit import IdleViTEva, IdleViTVisionTransformer
from .tome import ToMeEva, ToMeVisionTransformer

__all__ = ["PEER_METHODS", "AViTVisionTransformer", "DynamicViTVisionTransformer",
           "EViTVisionTransformer", "IdleViTVisionTransformer", "PeerMixin", "PeerTrace", "ToMeVisionTransformer",
           "as_peer", "peer_modules"]

PEERS = {cls.method: cls for cls in (ToMeVisionTransformer, EViTVisionTransformer, AViTVisionTransformer,
                                     IdleViTVisionTransformer, DynamicViTVisionTransformer)}
# the peers that run on timm's Eva (as_peer)
ROTARY_PEERS = {cls.method: cls for cls in (ToMeEva, EViTEva, AViTEva, IdleViTEva, DynamicViTEva)}
