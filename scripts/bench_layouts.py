"""The two layouts of a low-rank product, timed: what lora_lite.low_rank.RANK_LEFT is set from.

M Xᵀ for M (r, d) and X (T, d), the shape of h = x Aᵀ and of h's gradient g B, taken either with the rank side
on the left, (r, d) @ (d, T), or as (X Mᵀ)ᵀ, (T, d) @ (d, r): the same numbers, a different BLAS kernel. Timed
at the bench's token count, for the model's widths and ranks 4–32, interleaved; beside each the bandwidth the
faster layout reaches reading X, to set against the large copy's.
"""
from __future__ import annotations

import statistics

import torch

from bench_measure import interleaved

RANKS = (4, 8, 12, 16, 32)


def layouts(tokens: int, widths: list[int], dtype: str, device: str, clock, repeats: int) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(3)
    for d in widths:
        X = torch.randn(tokens, d, generator=g, device=device, dtype=getattr(torch, dtype))
        for r in RANKS:
            M = torch.randn(r, d, generator=g, device=device, dtype=X.dtype)
            runs = {"rank_left": lambda: M @ X.t(), "rank_right": lambda: X @ M.t()}
            times = interleaved(runs, repeats, f"layout d={d} r={r}", clock)
            rows.append({"d": d, "r": r, "tokens": tokens, "bytes_read": X.numel() * X.element_size(),
                         **{f"{k}_s": statistics.median(v) for k, v in times.items()}})
    return rows
