"""y + s · B A x written into y: the low-rank add every LoRA-shaped variant ends with, and its backward.

The two products that reduce over a wide side, h = x Aᵀ and h's gradient g B, are (T, d) @ (d, r) with a small
r. On the CPU (oneDNN / MKL) that runs up to 1.6× slower than the same product taken as (r, d) @ (d, T) for
ranks 5–12, and faster outside that band (`just bench` prints both layouts per shape: docs/benchmarks.md);
autograd's own backward of `F.linear` cannot choose. So training runs through `LowRankAdd`, an autograd
Function with its own backward, whose products take the faster layout for their rank: the
forward is one in-place `addmm_` on a 2-D view of y (no new (..., d_out) tensor, which on CPU costs more than
the low-rank product itself) and saves x (which the base layer saves anyway), hᵀ, A and B; the backward is
four plain matmuls. Without gradients the same products run bare. Autocast does not cast in-place ops, and
compilers fuse on their own: those take an out-of-place `addmm` over the same products.
"""
from __future__ import annotations

import torch


RANK_LEFT = range(5, 13)  # CPU ranks where M Xᵀ is faster as (r, d) @ (d, T) (measured: just bench's layout table)


def _times_t(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """M Xᵀ (r, T) for M (r, d) and X (T, d), in the layout that is faster for rank r (elsewhere than on the
    CPU, BLAS's usual (T, d) @ (d, r), as F.linear takes it)."""
    left = M.device.type == "cpu" and M.shape[0] in RANK_LEFT
    return M @ X.t() if left else (X @ M.t()).t()


def _ht(x2: torch.Tensor, A: torch.Tensor | None) -> torch.Tensor:
    """hᵀ (r, T) for the rows of x2 (T, d_in): A x2ᵀ, or x2ᵀ itself when x2 is h already (A None)."""
    return x2.t() if A is None else _times_t(A, x2)


class LowRankAdd(torch.autograd.Function):
    """y += s · (A x)ᵀ Bᵀ in place: y contiguous (..., d_out), x (..., d_in), A (r, d_in) or None (x is h),
    B (d_out, r), s a float."""

    @staticmethod
    def forward(ctx, y, x, A, B, s):
        x2 = x.reshape(-1, x.shape[-1])
        ht = _ht(x2, A)
        y.view(-1, y.shape[-1]).addmm_(ht.t(), B.t(), alpha=s)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x2, None if A is None else ht, A, B)
        ctx.s, ctx.x_shape = s, x.shape
        return y

    @staticmethod
    def backward(ctx, g):
        x2, ht, A, B = ctx.saved_tensors
        ht = x2.t() if A is None else ht
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = grad_A = grad_B = None
        if any(ctx.needs_input_grad[1:3]):
            grad_ht = _times_t(B.t(), g2).mul_(ctx.s)  # (r, T): s (g B)ᵀ
        if ctx.needs_input_grad[3]:
            grad_B = torch.mm(ht, g2).t().mul_(ctx.s)  # s gᵀ h, as (hᵀ g)ᵀ
        if A is None and ctx.needs_input_grad[1]:
            grad_x = grad_ht.t().view(ctx.x_shape)
        if A is not None and ctx.needs_input_grad[2]:
            grad_A = torch.mm(grad_ht, x2)
        if A is not None and ctx.needs_input_grad[1]:
            grad_x = torch.mm(grad_ht.t(), A).view(ctx.x_shape)
        return g, grad_x, grad_A, grad_B, None


def add_low_rank(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor, s: float) -> torch.Tensor:
    """y + s · B A x, written into y (nothing else holds it: the hook sees to that). A None: x is h = A x."""
    out_of_place = torch.compiler.is_compiling() or torch.is_autocast_enabled(y.device.type) or not y.is_contiguous()
    if not out_of_place and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (y, x, A, B)):
        return LowRankAdd.apply(y, x, A, B, s)
    ht = _ht(x.reshape(-1, x.shape[-1]), A)  # the same products as eager, in every branch
    if out_of_place:
        return torch.addmm(y.reshape(-1, y.shape[-1]), ht.t(), B.t(), alpha=s).view(y.shape)
    y.view(-1, y.shape[-1]).addmm_(ht.t(), B.t(), alpha=s)
    return y
