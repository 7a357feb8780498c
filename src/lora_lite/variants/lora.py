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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import AdapterConfig
from ..variant import ParamSpec, dropout, kaiming, register, zeros


@dataclass
class LoRAConfig(AdapterConfig):
    use_rslora: bool = False


def scale(cfg: LoRAConfig) -> float:
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)


def add_low_rank(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """y + s · h Bᵀ as one fused matmul-add, written into y; h is (..., r), B is (d_out, r).

    The runtime hands forward a y that nothing else holds (adapter._hook), so the sum goes into y in
    place: no new (..., d_out) tensor, which on CPU costs more than the low-rank product itself.
    Autocast does not cast in-place ops, and compilers fuse on their own: those take the out-of-place addmm.
    """
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(y.device.type) or y.dim() not in (2, 3):
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(), alpha=s)
        return out.view(y.shape)
    h = h.reshape(*y.shape[:-1], h.shape[-1])
    if y.dim() == 2:
        return y.addmm_(h, B.t(), alpha=s)
    return y.baddbmm_(h, B.t().expand(y.shape[0], -1, -1), alpha=s)  # no view of y: autograd stays cheap


@register
class LoRA:
    name = "lora"
    config = LoRAConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), kaiming), "lora_B": ParamSpec((d_out, cfg.r), zeros)}

    @staticmethod
    def forward(layer, x, y):
        h = F.linear(dropout(layer, x), layer.lora_A)  # (..., r)
        return add_low_rank(y, h, layer.lora_B, scale(layer.lora_config))

    @staticmethod
    def delta_weight(layer):
        return scale(layer.lora_config) * (layer.lora_B @ layer.lora_A)
