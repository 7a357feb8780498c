"""GraLoRA: granular low-rank adaptation (Jung et al. 2025, https://arxiv.org/abs/2505.20355).

x splits into k blocks x_i (d_in/k), the output into k blocks; A[i] is (d_in/k, r), B[j] is (r, d_out/k):

    h_i = x_i A[i],  h'_j = concat_i h_i[j r/k : (j+1) r/k]  (the exchange),  out_j = h'_j B[j]
    h = W x + s · (out + B_g (A_g x)),   s = alpha / (r + hybrid_r)

Block (j, i) of ΔW has rank r/k, the update rank up to k r, with r (d_in + d_out) parameters, as LoRA.
hybrid_r > 0 adds a plain LoRA pair A_g (hybrid_r, d_in), B_g (d_out, hybrid_r); r excludes it, as in PEFT.
Identity at t=0 is exact: B and B_g start at zero. Checked against PEFT 0.21 `peft/tuners/gralora/layer.py`
(`update_layer`, `Linear.forward`, `get_delta_weight`): same shapes, init, scale, outputs (tests/test_gralora.py).
"""
from dataclasses import dataclass

import torch

from ..config import AdapterConfig, check_int
from ..variant import ParamSpec, Variant, add_low_rank, dropout, kaiming, register, zeros


@dataclass
class GraLoRAConfig(AdapterConfig):
    k: int = 2
    hybrid_r: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int("GraLoRA k", self.k, 1)
        if self.r % self.k:
            raise ValueError(f"GraLoRA k={self.k} does not divide r={self.r}: choose r as a multiple of k")


def block_kaiming(t: torch.Tensor) -> None:
    """PEFT's init: each block's (r, d_in/k) matrix Kaiming (fan_in d_in/k), drawn contiguous, stored transposed."""
    for block in t:  # (d_in/k, r)
        kaiming(w := torch.empty(block.shape[::-1], dtype=t.dtype, device=t.device))
        block.copy_(w.t())


def scale(cfg: GraLoRAConfig) -> float:
    return cfg.alpha / (cfg.r + cfg.hybrid_r)


def lora_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The same update as one LoRA of rank k r + hybrid_r: (A' (k r + h, d_in), B' (d_out, k r + h)), unscaled."""
    A, B, k = layer.lora_A, layer.lora_B, layer.lora_A.shape[0]  # (k, d_in/k, r), (k, r, d_out/k)
    At = torch.block_diag(*A.transpose(1, 2))  # (k r, d_in), rows (i, j, t): block i is A[i]ᵀ
    At = At.view(k, k, -1, At.shape[1]).transpose(0, 1).reshape(At.shape)  # rows (j, i, t): the exchange
    Bt = torch.block_diag(*B.transpose(1, 2))  # (d_out, k r): block j is B[j]ᵀ
    if layer.lora_config.hybrid_r:
        At, Bt = torch.cat([At, layer.lora_A_general]), torch.cat([Bt, layer.lora_B_general], dim=1)
    return At, Bt


@register
class GraLoRA(Variant):
    name = "gralora"
    config = GraLoRAConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        k, r, hr = cfg.k, cfg.r, cfg.hybrid_r
        for what, n in (("d_in", d_in), ("d_out", d_out)):  # r % k: checked by the config
            if n % k:
                raise ValueError(f"GraLoRA k={k} does not divide {what}={n}: choose k dividing d_in, d_out and r")
        general = {"lora_A_general": ParamSpec((hr, d_in), kaiming), "lora_B_general": ParamSpec((d_out, hr), zeros)}
        return {"lora_A": ParamSpec((k, d_in // k, r), block_kaiming), "lora_B": ParamSpec((k, r, d_out // k), zeros),
                **(general if hr else {})}

    @staticmethod
    def forward(layer, x, y):
        At, Bt = lora_factors(layer)
        return add_low_rank(y, dropout(layer, x), At, Bt, scale(layer.lora_config))

    @staticmethod
    def lora_factors(layer):
        return *lora_factors(layer), scale(layer.lora_config)  # the module-level factors, with their scale
