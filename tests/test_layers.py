"""The block executors of tpcvit.layers: the functional plain-block path is bitwise timm's block, and it steps aside
wherever it would not be (training, hooks, blocks with other parts)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

import tpcvit  # noqa: F401  (import guard before timm's torchvision import)
from tpcvit.layers import LeanDenseViT, block_forward, context_block, plain_block


def _block(**kw) -> Block:
    torch.manual_seed(0)
    return Block(32, 4, qkv_bias=True, **kw).eval()


def _tokens(b: int = 3, t: int = 9) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(b, t, 32)


@torch.no_grad()
def test_plain_block_forward_is_bitwise_timm_with_and_without_a_mask():
    blk, x = _block(), _tokens()
    assert plain_block(blk) is not None
    assert torch.equal(block_forward(blk, x), blk(x))
    bias = torch.zeros(3, 1, 1, 9).masked_fill(torch.rand(3, 1, 1, 9) > 0.6, float("-inf"))
    bias[..., 0] = 0.0
    assert torch.equal(block_forward(blk, x, bias), blk(x, attn_mask=bias))


@torch.no_grad()
def test_block_forward_leaves_other_blocks_training_and_hooks_to_timm():
    x = _tokens()
    assert plain_block(_block(init_values=0.1)) is None  # LayerScale: not a plain block
    assert plain_block(_block(qk_norm=True)) is None
    seen = []
    blk = _block()
    handle = blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    block_forward(blk, x)
    assert seen == [x.shape]  # the hook saw the call: the block ran as blk(x)
    handle.remove()
    blk.train()
    calls = []
    blk.mlp.register_forward_hook(lambda m, i, o: calls.append(1))
    block_forward(blk, x)
    assert calls == [1]  # training: timm's modules (dropout, drop-path) run


@torch.no_grad()  # the cache serves inference; with autograd on, a block's views are made afresh
def test_plain_block_cache_follows_replaced_weights_and_parts():
    blk = _block()
    first = plain_block(blk)
    assert plain_block(blk) is first  # cached
    blk.attn.qkv.weight = nn.Parameter(torch.zeros_like(blk.attn.qkv.weight))
    assert plain_block(blk).qkv[0].data_ptr() == blk.attn.qkv.weight.data_ptr()
    x = _tokens()
    blk.double()  # new data under the same parameter objects: rebuilt, the views follow the data
    assert plain_block(blk).qkv[0].dtype == torch.float64 and plain_block(blk).fc2[1].dtype == torch.float64
    assert plain_block(blk).kv[0].data_ptr() != first.kv[0].data_ptr()
    assert torch.equal(block_forward(blk, x.double()), blk(x.double()))
    blk.mlp.act = nn.ReLU()
    assert plain_block(blk) is None


@pytest.mark.parametrize("class_attention", [False, True])
@torch.no_grad()
def test_context_block_plain_path_is_bitwise_the_module_path(class_attention):
    blk, x = _block(), _tokens()
    tokens = x[:, [0, 2, 5]]
    fast = context_block(blk, tokens, x, class_attention=class_attention)
    blk.train()  # no dropout configured: the module path computes the same formula
    modules = context_block(blk, tokens, x, class_attention=class_attention)
    for a, b in zip(fast if class_attention else (fast,), modules if class_attention else (modules,)):
        assert torch.equal(a, b)
    # and it is the block on the whole sequence, restricted to the rows of the tokens
    full = blk.eval()(x)[:, [0, 2, 5]]
    assert torch.allclose(fast[0] if class_attention else fast, full, atol=1e-5)


def test_prefix_positions_are_the_same_on_the_one_prefix_shortcut():
    from tpcvit.tokens import _with_prefix

    index = torch.tensor([[3, 0, 7], [1, 2, 4]])
    assert torch.equal(_with_prefix(index, 1), torch.tensor([[0, 4, 1, 8], [0, 2, 3, 5]]))
    assert torch.equal(_with_prefix(index, 2), torch.tensor([[0, 1, 5, 2, 9], [0, 1, 3, 4, 6]]))


def test_context_block_keeps_the_gradient_after_an_inference_call():
    """A block first seen under no-grad / inference mode is cached; an eval forward with autograd must still reach
    the weights (the eval-with-gradients path trains through context_block)."""
    blk, x = _block(), _tokens()
    with torch.inference_mode():
        context_block(blk, x[:, :3], x)
    with torch.no_grad():
        context_block(blk, x[:, :3], x)
    context_block(blk, x[:, :3], x).square().sum().backward()
    assert blk.attn.qkv.weight.grad is not None and blk.attn.qkv.weight.grad[:32].abs().sum() > 0
    assert blk.attn.qkv.weight.grad[32:].abs().sum() > 0


def test_stabilizer_picks_its_fastest_execution_once_per_shape_at_inference_only():
    """Inference times the stabilizer's executions (the depthwise convolution in both memory layouts, the gather of
    each token's neighbourhood) once per shape and keeps the fastest (the same result every way, the prefix token
    untouched); training, FLOP/op counting and tracing use one fixed execution and time nothing. The gather's
    tables follow the weights (an in-place update rebuilds them)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tpcvit.layers import TokenGridStabilizer
    from tpcvit.layers import stabilizer as S

    torch.manual_seed(0)
    stab = TokenGridStabilizer(8)
    nn.init.normal_(stab.conv.weight)
    nn.init.normal_(stab.conv.bias)
    x = torch.randn(2, 1 + 12, 8)
    S._EXECUTION.clear()
    stab(x, 1, (3, 4)).sum().backward()  # training: nothing timed
    with FlopCounterMode(display=False), torch.no_grad():
        stab(x, 1, (3, 4))
    assert S._EXECUTION == {}
    with torch.no_grad():
        expected = x.clone()  # the definition: prefix untouched, patches + depthwise conv (zero padding) + bias
        grid = x[:, 1:].reshape(2, 3, 4, 8).permute(0, 3, 1, 2)
        local = F.conv2d(grid, stab.conv.weight, stab.conv.bias, padding=1, groups=8)
        expected[:, 1:] += local.flatten(2).transpose(1, 2)
        out = stab(x, 1, (3, 4))
        key = (x.device, x.dtype, 2, 13, 8, 1, 3, 4)
        assert set(S._EXECUTION) == {key} and S._EXECUTION[key] in S.EXECUTIONS
        torch.testing.assert_close(out, expected)
        for execution in (*S.EXECUTIONS, S.COMPILED_EXECUTION):
            S._EXECUTION[key] = execution
            torch.testing.assert_close(stab(x, 1, (3, 4)), expected)
            assert torch.equal(stab(x, 1, (3, 4))[:, :1], x[:, :1])  # the prefix token is untouched
        stab.conv.weight.mul_(2.0)  # in place (an optimizer step, load_state_dict): the tables follow
        doubled = stab.run(x, 1, (3, 4), "gather")
        torch.testing.assert_close(doubled, stab.run(x, 1, (3, 4), "conv-nchw"))
        assert not torch.allclose(doubled, out)
        for execution in ("gather", S.COMPILED_EXECUTION):  # no prefix (Swin)
            torch.testing.assert_close(stab.run(x[:, 1:], 0, (3, 4), execution),
                                       stab.run(x[:, 1:], 0, (3, 4), "conv-channels-last"))
    grads = {}  # compiled training takes the shifted execution: the same gradients as the convolution
    for execution in ("conv-channels-last", S.COMPILED_EXECUTION):
        stab.zero_grad()
        xg = x.clone().requires_grad_()
        stab.run(xg, 1, (3, 4), execution).square().sum().backward()
        grads[execution] = (xg.grad, stab.conv.weight.grad.clone(), stab.conv.bias.grad.clone())
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b)


@torch.no_grad()
def test_lean_dense_vit_is_bitwise_timms_model_and_refuses_other_families():
    """The fair dense baseline for latency computes exactly what timm's model computes, with fewer calls."""
    import timm

    from tpcvit.breakdown import count_ops

    torch.manual_seed(0)
    dense = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    lean = LeanDenseViT(dense)
    assert torch.equal(lean(x), dense(x))
    assert count_ops(lambda: lean(x)) < count_ops(lambda: dense(x))
    with pytest.raises(TypeError, match="VisionTransformer"):
        LeanDenseViT(nn.Linear(2, 2))


@torch.no_grad()
def test_counting_gmacs_leaves_every_module_in_its_own_mode():
    """Counting (and every helper that runs a model in eval mode for a moment) restores each submodule's own flag:
    ``model.train(was_training)`` once spread a fresh wrapper's training flag into the eval model inside it, and
    ``tpcvit bench``'s dense-lean row then ran timm's block calls instead of the lean executor."""
    import timm

    from tpcvit.breakdown import count_ops
    from tpcvit.flops import count_gmacs, measured_gmacs

    dense = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2, num_classes=5).eval()
    lean = LeanDenseViT(dense)
    assert not lean.training  # the wrapped model's mode, not a fresh module's
    x = torch.randn(2, 3, 32, 32)
    lean_ops = count_ops(lambda: lean(x))
    for count in (count_gmacs, measured_gmacs):
        lean.training = True  # a wrapper in training mode around an eval model: the case that went wrong
        assert count(lean, x) > 0
        assert lean.training and not any(m.training for m in dense.modules())
        assert count_ops(lambda: lean(x)) == lean_ops < count_ops(lambda: dense(x))  # still the lean executor
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    mixed[1].eval()
    with tpcvit.layers.eval_mode(mixed):
        assert not any(m.training for m in mixed.modules())
    assert [m.training for m in mixed.modules()] == [True, True, False]
