"""Reusable parts of every token-reduction model (timm's ``layers/`` idea): block executors that run a timm block
on a token selection, attention parts, the controller head, the stabilizer, image geometry checks."""

from .eva_block import (
    check_timm_eva,
    eva_attend,
    eva_attention_half,
    eva_context_block,
    eva_embed,
    eva_mlp_half,
    pool_rope,
    rope_rows,
    spread_rope,
)
from .geometry import (
    check_fixed_grid,
    check_images,
    dynamic_size,
    embed_tokens,
    eval_mode,
    image_geometry,
    image_grid,
    unwrap,
)
from .heads import ControllerHead
from .onednn import OneDNNLinear, OneDNNMlp, PackedLinear, onednn_available, onednn_linears
from .stabilizer import TokenGridStabilizer
from .swin_block import sparse_swin_block, upsample_tokens, window_attention_heads
from .vit_block import (
    LeanDenseViT,
    PlainBlock,
    attend,
    attention_half,
    attention_output,
    attention_parts,
    block_forward,
    block_rows,
    check_timm_vit,
    class_row_attention,
    context_block,
    context_rows,
    lean_dense,
    mlp_half,
    packed_block,
    packed_selection_block,
    plain_block,
    supports_packing,
)

__all__ = ["ControllerHead", "LeanDenseViT", "OneDNNLinear", "OneDNNMlp", "PackedLinear", "PlainBlock",
           "TokenGridStabilizer", "attend", "attention_half", "attention_output", "attention_parts", "block_forward",
           "block_rows", "check_fixed_grid", "check_images", "check_timm_eva", "check_timm_vit", "class_row_attention",
           "context_block", "context_rows", "dynamic_size", "embed_tokens", "eva_attend", "eva_attention_half",
           "eva_context_block", "eva_embed", "eva_mlp_half", "eval_mode", "image_geometry", "image_grid", "lean_dense",
           "mlp_half", "onednn_available", "onednn_linears", "packed_block", "packed_selection_block", "plain_block",
           "pool_rope", "rope_rows", "sparse_swin_block", "spread_rope", "supports_packing", "unwrap",
           "upsample_tokens", "window_attention_heads"]
