"""TPC model families, registered in timm's registry on import: DeiT/ViT, LV-ViT, Swin."""

from .lvvit import LVViT, TPCLVViT
from .swin import TPCSwinTransformer
from .vit import TPCVisionTransformer, TPCVisionTransformerDistilled, TPCViTMixin, create_tpc_vit

__all__ = ["LVViT", "TPCLVViT", "TPCSwinTransformer", "TPCViTMixin", "TPCVisionTransformer",
           "TPCVisionTransformerDistilled", "create_tpc_vit"]
