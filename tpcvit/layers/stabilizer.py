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

# Inference: the fastest way to run the stabilizer per (device, dtype, shape), timed once. The depthwise convolution
# in either memory layout, or as a gather of each token's 3x3 neighbourhood times per-position weights (the residual
# and the zero padding folded in: 4 ops, no convolution). oneDNN's depthwise kernels differ by CPU and batch: on an
# Intel Xeon (torch 2.13) channels-last runs 1.5x faster than NCHW at batch 1 but NCHW 4x faster at batch 32-256
# (an AMD EPYC favoured channels-last at every batch); at batch 1 on a 7x7 grid the convolution call itself costs
# ~70 us, the gather ~20 us.
# Under torch.compile the stabilizer is written as the sum of its nine shifted, weighted copies of the zero-padded
# grid ("shifted"): pointwise work that inductor fuses into one loop with the residual and the bias, where a
# convolution stays an external kernel call (main-job model, batch 1, TPC deciding once, over compiled dense: 0.94x
# -> 1.17-1.24x in two runs; cpu_mainjob_methods_compiled.md). In eager mode it is ~20 kernels: never chosen there.
_EXECUTION: dict[tuple, str] = {}
EXECUTIONS = ("conv-channels-last", "conv-nchw", "gather")  # the eager candidates, timed per shape
COMPILED_EXECUTION = "shifted"
_GATHER_MAX_ELEMENTS = 1 << 22  # 16 MB of float32 neighbourhoods (DeiT-S at batch 1: 0.7M elements)


class TokenGridStabilizer(nn.Module):
    """``x_patch <- x_patch + dwconv3x3(x_patch on its H x W grid)``; prefix tokens untouched."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self._tables: tuple | None = None  # (what they were built from, neighbour rows, weights, bias): gather

    def forward(self, x: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
        execution = "conv-channels-last"  # training, tracing and counting (FLOPs, ops): one fixed way
        if torch.compiler.is_compiling():
            execution = COMPILED_EXECUTION
        elif not (torch.is_grad_enabled() or torch.jit.is_tracing() or is_in_torch_dispatch_mode()
                  or x.device.type == "meta"):  # a meta tensor has no data to time or to build tables from
            key = (x.device, x.dtype, *x.shape, num_prefix, *grid)
            execution = _EXECUTION.get(key) or _EXECUTION.setdefault(key, self._fastest(x, num_prefix, grid))
        return self.run(x, num_prefix, grid, execution)

    def run(self, x: torch.Tensor, num_prefix: int, grid: tuple[int, int], execution: str) -> torch.Tensor:
        """The stabilizer executed one way (:data:`EXECUTIONS`, :data:`COMPILED_EXECUTION`); every way computes the
        same function."""
        if execution == "gather":
            rows, weights, bias = self._gather_tables(x, num_prefix, grid)
            b, t, d = x.shape
            # in place on the fresh neighbourhood copy: 6 us less per call than vecdot + add at batch 1 (main job)
            return x.index_select(1, rows).view(b, t, -1, d).mul_(weights).sum(2).add_(bias)
        if execution == COMPILED_EXECUTION:
            local = self._shifted_local(x[:, num_prefix:], *grid)
        else:
            layout = torch.channels_last if execution == "conv-channels-last" else torch.contiguous_format
            local = self._local(x[:, num_prefix:], *grid, layout)
        # the prefix rows get zeros: two ops (clone + in-place add on a slice are five: batch-1 latency)
        return x + F.pad(local, (0, 0, num_prefix, 0)) if num_prefix else x + local

    def _shifted_local(self, patches: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The convolution of ``[B, N, D]`` patch tokens as the sum over the kernel's taps of the zero-padded grid
        shifted by the tap, times the tap's per-channel weight: slices and pointwise ops only (what a compiler
        fuses into one loop)."""
        b, _, d = patches.shape
        k = self.conv.kernel_size[0]
        r = k // 2
        padded = F.pad(patches.reshape(b, h, w, d), (0, 0, r, r, r, r))
        taps = self.conv.weight.reshape(d, k, k).to(patches.dtype)
        local = self.conv.bias.to(patches.dtype).expand(b, h, w, d)
        for i in range(k):
            for j in range(k):
                local = local + padded[:, i:i + h, j:j + w] * taps[:, i, j]
        return local.reshape(b, h * w, d)

    def _local(self, patches: torch.Tensor, h: int, w: int, layout: torch.memory_format) -> torch.Tensor:
        """The convolution of ``[B, N, D]`` patch tokens (a channels-last image as they lie) in ``layout``."""
        b, _, d = patches.shape
        img = patches.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        return self.conv(img).permute(0, 2, 3, 1).reshape(b, h * w, d)

    def _gather_tables(self, x: torch.Tensor, num_prefix: int, grid: tuple[int, int]):
        """For every token row (prefix rows included): the rows of its k x k neighbourhood ``[T * k * k]`` and their
        weights ``[T, k * k, D]``, plus the bias ``[T, D]``, so that ``out = sum_j x[rows_j] * weight_j + bias`` is
        the whole stabilizer. A neighbour outside the grid (the convolution's zero padding) points at the row itself
        with weight 0; the residual adds 1 to the centre weight; a prefix row is itself times 1. Built under
        no_grad, kept until the weights change (their version counters) or the shape does."""
        weight, bias = self.conv.weight, self.conv.bias
        made_of = (weight._version, bias._version, weight.data_ptr(), bias.data_ptr(), x.device, x.dtype,
                   num_prefix, grid)
        if self._tables is not None and self._tables[0] == made_of:
            return self._tables[1:]
        h, w = grid
        k, d = weight.shape[-1], weight.shape[0]
        r = k // 2
        t = num_prefix + h * w
        rows = torch.arange(t).repeat_interleave(k * k).view(t, k * k)
        taps = weight.detach().reshape(d, k * k).t().to("cpu", x.dtype)  # [k*k, D]; one copy from a GPU, not T*k*k
        per_row = torch.zeros(t, k * k, d, dtype=x.dtype)
        for i in range(h):
            for j in range(w):
                row = num_prefix + i * w + j
                for tap in range(k * k):
                    di, dj = tap // k - r, tap % k - r
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        rows[row, tap] = num_prefix + (i + di) * w + (j + dj)
                        per_row[row, tap] = taps[tap]
        per_row[:, (k * k) // 2] += 1.0  # the residual; a prefix row (no taps set): itself through the centre
        full_bias = torch.zeros(t, d, dtype=x.dtype)
        full_bias[num_prefix:] = bias.detach().to("cpu", x.dtype)
        tables = (rows.reshape(-1).to(x.device), per_row.to(x.device), full_bias.to(x.device))
        self._tables = (made_of, *tables)
        return tables

    def _fastest(self, x: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> str:
        """Time every execution on these tokens and keep the fastest: best of five calls each after a warm-up, the
        candidates interleaved (a one-off stall of a shared machine then hits one call, not one candidate's all:
        timed one after the other, a main-job stabilizer at batch 256 once chose a 2.6x slower layout)."""
        b, t, d = x.shape
        k = self.conv.kernel_size[0]
        # the gather materialises every token's k x k neighbourhood: for small batches only (bounded memory)
        candidates = EXECUTIONS if b * t * k * k * d <= _GATHER_MAX_ELEMENTS else EXECUTIONS[:2]
        seconds = dict.fromkeys(candidates, float("inf"))
        for execution in candidates:
            self.run(x, num_prefix, grid, execution)
        for _ in range(5):
            for execution in candidates:
                if x.device.type == "cuda":
                    torch.cuda.synchronize(x.device)
                start = time.perf_counter()
                self.run(x, num_prefix, grid, execution)
                if x.device.type == "cuda":
                    torch.cuda.synchronize(x.device)
                seconds[execution] = min(seconds[execution], time.perf_counter() - start)
        return min(seconds, key=seconds.get)
