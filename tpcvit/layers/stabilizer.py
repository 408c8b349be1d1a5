"""Model stabilizer: cheap local image structure on the token grid (docs/METHOD.md section 4).

A depthwise 3x3 convolution over the patch-token grid, added residually (positional-encoding-generator
style). Placed before the early blocks (up to and including the controller's start block), it lets each token
carry its neighbourhood into the pause/restart decisions and damps the accuracy fluctuation of fine-tuning.
Weights start at zero, so a freshly built model is exactly its dense backbone.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

# Inference: the faster memory layout of the depthwise convolution per (device, dtype, shape), timed once. oneDNN's
# depthwise kernels differ by CPU: on an Intel Xeon (torch 2.13) channels-last runs 1.5x faster at batch 1 but NCHW
# 4x faster at batch 32-256, where an AMD EPYC favoured channels-last at every batch (~20x at DeiT-S, batch 32).
_LAYOUT: dict[tuple, torch.memory_format] = {}


class TokenGridStabilizer(nn.Module):
    """``x_patch <- x_patch + dwconv3x3(x_patch on its H x W grid)``; prefix tokens untouched."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
        b, t, d = x.shape
        h, w = grid
        patches = x[:, num_prefix:]
        layout = torch.channels_last  # training, tracing, compiling and counting (FLOPs, ops): one fixed layout
        if not (torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or is_in_torch_dispatch_mode()):
            key = (x.device, x.dtype, b, h, w, d)
            layout = _LAYOUT.get(key) or _LAYOUT.setdefault(key, self._fastest_layout(patches, h, w))
        local = self._local(patches, h, w, layout)
        # the prefix rows get zeros: two ops (clone + in-place add on a slice are five: batch-1 latency)
        return x + F.pad(local, (0, 0, num_prefix, 0)) if num_prefix else x + local

    def _local(self, patches: torch.Tensor, h: int, w: int, layout: torch.memory_format) -> torch.Tensor:
        """The convolution of ``[B, N, D]`` patch tokens (a channels-last image as they lie) in ``layout``."""
        b, _, d = patches.shape
        img = patches.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        return self.conv(img).permute(0, 2, 3, 1).reshape(b, h * w, d)

    def _fastest_layout(self, patches: torch.Tensor, h: int, w: int) -> torch.memory_format:
        """Time both layouts on these tokens (best of three calls after a warm-up) and keep the faster."""
        seconds = {}
        for layout in (torch.channels_last, torch.contiguous_format):
            self._local(patches, h, w, layout)
            best = float("inf")
            for _ in range(3):
                if patches.device.type == "cuda":
                    torch.cuda.synchronize(patches.device)
                start = time.perf_counter()
                self._local(patches, h, w, layout)
                if patches.device.type == "cuda":
                    torch.cuda.synchronize(patches.device)
                best = min(best, time.perf_counter() - start)
            seconds[layout] = best
        return min(seconds, key=seconds.get)
