"""TPC model families, registered in timm's registry on import."""

from .vit import TPCVisionTransformer, TPCVisionTransformerDistilled, TPCViTMixin, create_tpc_vit

__all__ = ["TPCViTMixin", "TPCVisionTransformer", "TPCVisionTransformerDistilled", "create_tpc_vit"]
