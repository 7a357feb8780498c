"""LoRA: low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    h = W x + s · B (A dropout(x)),   s = alpha / r   (alpha / sqrt(r) with rsLoRA,
                                                       Kalajdzievski 2023, arXiv 2312.03732)

A (r, d_in) is Kaiming-uniform, B (d_out, r) is zero, so the adapter is exactly
the identity at t=0. The forward never forms B A: it computes the small
h = x Aᵀ (..., r) and adds s · h Bᵀ to y in one addmm (scale and add fused).

Checked against PEFT 0.21 `peft/tuners/lora/layer.py` (`Linear.forward`,
`reset_lora_parameters`): same names, shapes, init and outputs (tests/test_parity_lora.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..variant import ParamSpec, ScaledConfig, Variant, add_low_rank, dropout, kaiming, register, zeros


@dataclass
class LoRAConfig(ScaledConfig):
    pass


@register
class LoRA(Variant):
    name = "lora"
    config = LoRAConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), kaiming), "lora_B": ParamSpec((d_out, cfg.r), zeros)}

    @staticmethod
    def forward(layer, x, y):
        return add_low_rank(y, dropout(layer, x), layer.lora_A, layer.lora_B, layer.lora_config.scale())

    @staticmethod
    def lora_factors(layer):
        return layer.lora_A, layer.lora_B, layer.lora_config.scale()
