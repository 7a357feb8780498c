"""y + s · h Bᵀ written into y: the add every LoRA-shaped variant ends with, and its backward.

Eager and training, the add is `LowRankAdd`, an autograd Function: the forward is one in-place `addmm_` on a
2-D view of y (no new (..., d_out) tensor, which on CPU costs more than the low-rank product itself), and the
backward is two plain 2-D matmuls over the output gradient g: g B for h and hᵀ g for B. Autograd's own
in-place `baddbmm_` on the 3-D y costs two `bmm`s over the batch and an expand-sum for B, and an in-place
write through a view of y costs a `CopySlices` node that copies the gradient; on the bench's Qwen3 the
Function's train step is about 3% faster than `baddbmm_` (docs/benchmarks.md).

Without gradients the add is the bare `addmm_`. Autocast does not cast in-place ops, and compilers fuse on
their own: those take the out-of-place `addmm`.
"""
from __future__ import annotations

import torch


class LowRankAdd(torch.autograd.Function):
    """y += s · h Bᵀ in place; y contiguous (..., d_out), h (..., r), B (d_out, r), s a float."""

    @staticmethod
    def forward(ctx, y, h, B, s):
        ctx.s, ctx.h_shape = s, h.shape
        h = h.reshape(-1, h.shape[-1])
        y.view(-1, y.shape[-1]).addmm_(h, B.t(), alpha=s)
        ctx.mark_dirty(y)
        ctx.save_for_backward(h, B)
        return y

    @staticmethod
    def backward(ctx, g):
        h, B = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        grad_h = grad_B = None
        if ctx.needs_input_grad[1]:
            grad_h = torch.mm(g2, B).mul_(ctx.s).view(ctx.h_shape)
        if ctx.needs_input_grad[2]:
            grad_B = torch.mm(h.t(), g2).t().mul_(ctx.s)  # (r, T) @ (T, d_out): the faster layout on CPU
        return g, grad_h, grad_B, None


def add_low_rank(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """y + s · h Bᵀ as one fused matmul-add, written into y (nothing else holds it: the hook sees to that)."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(y.device.type) or not y.is_contiguous():
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(), alpha=s)
        return out.view(y.shape)
    if torch.is_grad_enabled() and (y.requires_grad or h.requires_grad or B.requires_grad):
        return LowRankAdd.apply(y, h, B, s)
    y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), B.t(), alpha=s)
    return y
