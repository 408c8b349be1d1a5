"""TPC model families, registered in timm's registry on import: DeiT/ViT, LV-ViT, Swin."""

from ..layers import image_geometry
from ._builder import DEIT_SIZES, PEER_METHODS, dense_name, reducer_method, variant_name
from .lvvit import LVViT, TPCLVViT
from .swin import TPCSwinTransformer
from .vit import TPCVisionTransformer, TPCVisionTransformerDistilled, TPCViT, create_tpc_vit

__all__ = ["DEIT_SIZES", "LVViT", "PEER_METHODS", "TPCLVViT", "TPCSwinTransformer", "TPCViT", "TPCVisionTransformer",
           "TPCVisionTransformerDistilled", "create_tpc_vit", "dense_name", "image_geometry", "reducer_method",
           "variant_name"]
