"""TPC model families, registered in timm's registry on import: DeiT/ViT, LV-ViT, Swin; and the Eva (RoPE) adapter
``tpcvit.patch`` / ``with_tpc`` convert EVA-02, DINOv3, RoPE ViTs and Perception Encoder models with."""

from ..layers import image_geometry
from ._builder import DEIT_SIZES, PEER_METHODS, dense_name, reducer_method, variant_name
from .eva import TPCEva
from .lvvit import LVViT, TPCLVViT
from .swin import TPCSwinTransformer
from .vit import TPCVisionTransformer, TPCVisionTransformerDistilled, TPCViT, create_tpc_vit

__all__ = ["DEIT_SIZES", "LVViT", "PEER_METHODS", "TPCEva", "TPCLVViT", "TPCSwinTransformer", "TPCViT",
           "TPCVisionTransformer", "TPCVisionTransformerDistilled", "create_tpc_vit", "dense_name", "image_geometry",
           "reducer_method", "variant_name"]
