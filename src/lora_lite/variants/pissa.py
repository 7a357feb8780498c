"""PiSSA: principal singular values and vectors adaptation (Meng et al. 2024, https://arxiv.org/abs/2404.02948).

    W = U S Vᵀ,  top r:  A0 = diag(sqrt(S_r / s)) V_rᵀ  (r, d_in),  B0 = U_r diag(sqrt(S_r / s))  (d_out, r)
    h = W x + s · (B A dropout(x) − B0 A0 x),   A, B trainable from A0, B0;  s = alpha / r (or alpha / sqrt(r))

The paper (and PEFT) write W_res = W − s B0 A0 into the weight and compute W_res x + s B A x; ours is the
same function with W untouched, so detach is bit-exact, the adapter file alone rebuilds the model on the
original base, and quantized bases work (the SVD reads the dequantized weight). We evaluate the update as
B (A x' − A0 x) + (B − B0)(A0 x): at t=0 both A x' − A0 x and B − B0 are exact zeros (same op on equal
tensors), so the identity is exact, and afterwards the small differences are formed before any large sum.
Without dropout (x' = x) that is one rank-2r product [B, B − B0] [A − A0; A0] x, which costs what a LoRA
of rank 2r costs: one pass over x, one fused add into y. Dropout hits only the trainable path, as in PEFT.

Checked against PEFT 0.21 `peft/tuners/lora/layer.py` (`pissa_init`, `init_lora_weights="pissa"` and
`"pissa_niter_k"`): same factors, same outputs on the unmutated base, also after training (tests/test_pissa.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_int
from ..variant import ParamSpec, dropout, register
from ..weights import dense_weight
from .lora import LoRAConfig, add_low_rank, scale


@dataclass
class PiSSAConfig(LoRAConfig):
    niter: int | None = 4  # None: exact torch.linalg.svd; k: torch.svd_lowrank with k power iterations

    def __post_init__(self):
        super().__post_init__()
        if self.niter is not None:  # None: the full SVD
            check_int("niter", self.niter, 0)


@register
class PiSSA:
    name = "pissa"
    config = PiSSAConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        if cfg.r > min(d_in, d_out):
            raise ValueError(f"PiSSA r={cfg.r} is more than min(d_in, d_out)={min(d_in, d_out)}, the number of "
                             f"singular values of this layer: lower r or exclude the layer")
        A, B = (cfg.r, d_in), (d_out, cfg.r)
        return {"lora_A": ParamSpec(A), "lora_B": ParamSpec(B),
                "lora_A0": ParamSpec(A, as_buffer=True), "lora_B0": ParamSpec(B, as_buffer=True)}

    @staticmethod
    def init(layer, cfg):
        W = dense_weight(layer)  # (d_out, d_in) float32 copy; the base is never written
        if cfg.niter is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, :cfg.r], S[:cfg.r], Vh[:cfg.r]
        else:
            U, S, V = torch.svd_lowrank(W, q=cfg.r, niter=cfg.niter)
            Vh = V.t()
        root = torch.sqrt(S / scale(cfg))
        A, B = root[:, None] * Vh, U * root[None, :]
        for key, value in (("lora_A", A), ("lora_B", B), ("lora_A0", A), ("lora_B0", B)):
            getattr(layer, key).copy_(value)

    @staticmethod
    def forward(layer, x, y):
        A, B, A0, B0 = layer.lora_A, layer.lora_B, layer.lora_A0, layer.lora_B0
        xd = dropout(layer, x)
        if xd is x:  # one pass over x and one fused add, as a rank-2r LoRA: [B, B − B0] [A − A0; A0] x
            h = F.linear(x, torch.cat([A - A0, A0]))  # (..., 2r)
        else:  # dropout hits only the trainable path
            h0 = F.linear(x, A0)
            h = torch.cat([F.linear(xd, A) - h0, h0], dim=-1)
        return add_low_rank(y, h, torch.cat([B, B - B0], dim=1), scale(layer.lora_config))

    @staticmethod
    def delta_weight(layer):
        A, B, A0, B0 = layer.lora_A, layer.lora_B, layer.lora_A0, layer.lora_B0
        return scale(layer.lora_config) * (B @ (A - A0) + (B - B0) @ A0)
