"""GraLoRA: granular low-rank adaptation (Jung et al. 2025, https://arxiv.org/abs/2505.20355).

Split x into k input blocks x_i (d_in/k) and the output into k blocks; A[i] is (d_in/k, r), B[j] is (r, d_out/k):

    h_i = x_i A[i]                                   (k, r) per token
    h'_j = concat_i h_i[j r/k : (j+1) r/k]           output block j gathers the j-th r/k slice of every block
    out_j = h'_j B[j]
    h = W x + s · (out + B_g (A_g x)),   s = alpha / (r + hybrid_r)

so block (j, i) of ΔW has rank r/k, the whole update has rank up to k r, and the parameter count is
r (d_in + d_out), as LoRA's. hybrid_r > 0 adds a plain LoRA pair A_g (hybrid_r, d_in), B_g (d_out, hybrid_r).
Identity at t=0 is exact: B and B_g start at zero. r counts only the GraLoRA rank, as in PEFT.

Checked against PEFT 0.21 `peft/tuners/gralora/layer.py` (`update_layer`, `Linear.forward`,
`get_delta_weight`): same shapes, init, scale and outputs (tests/test_gralora.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import AdapterConfig, check_int
from ..variant import ParamSpec, dropout, kaiming, register, zeros
from .lora import add_low_rank

BLOCK_DIAG_MAX = 64  # forward runs block-diagonal while (k - 1) r, its extra FLOPs per element, is at most this


@dataclass
class GraLoRAConfig(AdapterConfig):
    k: int = 2
    hybrid_r: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int("GraLoRA k", self.k, 1)
        check_int("GraLoRA hybrid_r", self.hybrid_r, 0)
        if self.r % self.k:
            raise ValueError(f"GraLoRA k={self.k} does not divide r={self.r}: choose r as a multiple of k")


def block_kaiming(t: torch.Tensor) -> None:
    """PEFT's init: each block's (r, d_in/k) matrix Kaiming-uniform (fan_in d_in/k), stored transposed.

    Drawn contiguous, block by block, so a seeded init draws PEFT's numbers (uniform_ fills memory order)."""
    for block in t:  # (d_in/k, r)
        w = torch.empty(block.shape[::-1], dtype=t.dtype, device=t.device)
        kaiming(w)
        block.copy_(w.t())


def scale(cfg: GraLoRAConfig) -> float:
    return cfg.alpha / (cfg.r + cfg.hybrid_r)


@register
class GraLoRA:
    name = "gralora"
    config = GraLoRAConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        k, r, hr = cfg.k, cfg.r, cfg.hybrid_r
        for what, n in (("d_in", d_in), ("d_out", d_out), ("r", r)):
            if n % k:
                raise ValueError(f"GraLoRA k={k} does not divide {what}={n}: choose k dividing d_in, d_out and r")
        specs = {"lora_A": ParamSpec((k, d_in // k, r), block_kaiming), "lora_B": ParamSpec((k, r, d_out // k), zeros)}
        if hr:
            specs |= {"lora_A_general": ParamSpec((hr, d_in), kaiming),
                      "lora_B_general": ParamSpec((d_out, hr), zeros)}
        return specs

    @staticmethod
    def forward(layer, x, y):
        A, B, cfg = layer.lora_A, layer.lora_B, layer.lora_config
        k, d_in_k, r = A.shape
        x = dropout(layer, x)
        if (k - 1) * r <= BLOCK_DIAG_MAX:
            # One rank-k·r LoRA through block-diagonal stacks, the rows of Aᵀ ordered so that h comes out
            # already exchanged: x is read once, one fused add into y, no (..., d) copies. It costs k times
            # the low-rank FLOPs, which is cheaper than those copies while (k - 1) r is small.
            At = torch.block_diag(*A.transpose(1, 2))  # (k r, d_in), rows (i, j, t): block i is A[i]ᵀ
            At = At.view(k, k, r // k, -1).transpose(0, 1).reshape(k * r, -1)  # rows (j, i, t): the exchange
            Bd = torch.block_diag(*B)  # (k r, d_out): block j is B[j]
            if cfg.hybrid_r:  # the plain LoRA pair rides in the same product
                At, Bd = torch.cat([At, layer.lora_A_general]), torch.cat([Bd, layer.lora_B_general.t()])
            return add_low_rank(y, F.linear(x, At), Bd.t(), scale(cfg))
        h = torch.bmm(x.reshape(-1, k, d_in_k).transpose(0, 1), A)  # (k_in, M, r)
        m = h.shape[1]
        h = h.view(k, m, k, r // k).permute(2, 1, 0, 3).reshape(k, m, r)  # (k_out, M, k_in · r/k): the exchange
        y = torch.add(y, torch.bmm(h, B).transpose(0, 1).reshape(y.shape), alpha=scale(cfg))  # from (k_out, M, d_out/k)
        if cfg.hybrid_r:
            y = add_low_rank(y, F.linear(x, layer.lora_A_general), layer.lora_B_general, scale(cfg))
        return y

    @staticmethod
    def delta_weight(layer):
        A, B, cfg = layer.lora_A, layer.lora_B, layer.lora_config
        k, d_in_k, r = A.shape
        d_out_k = B.shape[2]
        # block (i, j) of ΔWᵀ is A[i][:, j-th r/k slice] @ B[j][i-th r/k slice, :]
        a = A.view(k, d_in_k, k, r // k).transpose(1, 2)  # (i, j, d_in/k, r/k)
        b = B.view(k, k, r // k, d_out_k).transpose(0, 1)  # (i, j, r/k, d_out/k)
        delta = (a @ b).permute(1, 3, 0, 2).reshape(k * d_out_k, k * d_in_k)  # (d_out, d_in)
        if cfg.hybrid_r:
            delta = delta + layer.lora_B_general @ layer.lora_A_general
        return scale(cfg) * delta
