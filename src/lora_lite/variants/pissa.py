"""PiSSA: principal singular values and vectors adaptation (Meng et al. 2024, https://arxiv.org/abs/2404.02948).

    W = U S Vᵀ,  top r:  A0 = diag(sqrt(S_r / s)) V_rᵀ  (r, d_in),  B0 = U_r diag(sqrt(S_r / s))  (d_out, r)
    h = W x + s · (B A dropout(x) − B0 A0 x),  A, B trainable from A0, B0;  s = alpha / r (or alpha / sqrt(r))

The paper (and PEFT) write W_res = W − s B0 A0 into W and compute W_res x + s B A x; ours is that function with
W untouched: detach is bit-exact, the file alone rebuilds the model, quantized bases work. The update is
B (A x' − A0 x) + (B − B0)(A0 x): both differences are exact zeros at t=0 (exact identity); one rank-2r product.

Checked against PEFT 0.21 `peft/tuners/lora/layer.py` `pissa_init`: same factors and outputs (tests/test_pissa.py).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..variant import ParamSpec, ScaledConfig, Variant, add_low_rank, dropout, register
from ..weights import dense_weight


@dataclass
class PiSSAConfig(ScaledConfig):
    niter: int | None = 4  # None: exact torch.linalg.svd; k: torch.svd_lowrank with k power iterations

    def __post_init__(self):
        super().__post_init__()
        if self.alpha <= 0:
            raise ValueError(f"PiSSA alpha must be > 0: its factors are sqrt(S / (alpha / r)), got alpha={self.alpha}")


@register
class PiSSA(Variant):
    name = "pissa"
    config = PiSSAConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        if cfg.r > min(d_in, d_out):
            raise ValueError(f"PiSSA r={cfg.r} is more than min(d_in, d_out)={min(d_in, d_out)}, the number of "
                             f"singular values of this layer: lower r or exclude the layer")
        A, B = (cfg.r, d_in), (d_out, cfg.r)
        return {"lora_A": ParamSpec(A), "lora_B": ParamSpec(B), "lora_A0": ParamSpec(A, as_buffer=True),
                "lora_B0": ParamSpec(B, as_buffer=True)}

    @staticmethod
    def init(layer, cfg):
        W = dense_weight(layer)  # (d_out, d_in) float32 copy; the base is never written
        if cfg.niter is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        else:
            U, S, V = torch.svd_lowrank(W, q=cfg.r, niter=cfg.niter)
            Vh = V.t()
        root = torch.sqrt(S[:cfg.r] / cfg.scale())  # split sqrt(S) between the factors, as PEFT does
        A, B = root[:, None] * Vh[:cfg.r], U[:, :cfg.r] * root[None, :]
        for t, value in ((layer.lora_A, A), (layer.lora_B, B), (layer.lora_A0, A), (layer.lora_B0, B)):
            t.copy_(value)

    @staticmethod
    def dead_reason(layer):
        return None if layer.lora_A.any() else "the weight is all zero, so the factors and their gradients are zero"

    @staticmethod
    def forward(layer, x, y):
        A, B, A0, B0 = layer.lora_A, layer.lora_B, layer.lora_A0, layer.lora_B0
        B2, s = torch.cat([B, B - B0], dim=1), layer.lora_config.scale()
        if (xd := dropout(layer, x)) is x:  # one pass over x and one fused add, as a rank-2r LoRA
            return add_low_rank(y, x, torch.cat([A - A0, A0]), B2, s)
        h0 = F.linear(x, A0)  # dropout hits only the trainable path
        return add_low_rank(y, torch.cat([F.linear(xd, A) - h0, h0], dim=-1), None, B2, s)

    @staticmethod
    def delta_weight(layer):
        A, B, A0, B0 = layer.lora_A, layer.lora_B, layer.lora_A0, layer.lora_B0
        return layer.lora_config.scale() * (B @ (A - A0) + (B - B0) @ A0)

    @staticmethod
    def lora_factors(layer):  # rank 2r, as PEFT converts PiSSA for the unmodified base: s [B, -B0] [A; A0]
        A, B, A0, B0 = layer.lora_A, layer.lora_B, layer.lora_A0, layer.lora_B0
        return torch.cat([A, A0]), torch.cat([B, -B0], dim=1), layer.lora_config.scale()
