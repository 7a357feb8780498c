"""DeLoRA: decoupled low-rank adaptation (Bini et al. 2025, https://arxiv.org/abs/2503.18225).

    h = W x + B · diag(λ / r / (‖a_i‖ ‖b_i‖)) · A (w ⊙ dropout(x))
    ΔW = (B diag(λ / r / (‖a_i‖ ‖b_i‖)) A) ⊙ w[None, :]

a_i is row i of A (r, d_in), b_i column i of B (d_out, r), both norms clamped to >= 1e-4; w (d_in,) holds
the column norms ‖W[:, j]‖ read once at init; λ is one trainable scalar (init lambda0). Normalising each
rank-1 term bounds ‖ΔW‖ by λ (times the column norms) whatever the scale of A and B: the angle is learned
apart from the strength. A is Kaiming and B zero, so the adapter is exactly the identity at t=0; the first
optimizer step then makes ‖ΔW / w‖ jump to about λ/√r (see docs/variants.md). `alpha` is not used.

The forward folds w and the per-rank scale into a small (r, d_in) copy of A, so it costs what LoRA costs.

Checked against PEFT 0.21 `peft/tuners/delora/layer.py` (`DeloraLinear.forward`, `_compute_delta`,
`reset_delora_parameters`): same names, shapes, init, norms and outputs (tests/test_delora.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig, check_number
from ..variant import ParamSpec, Variant, add_low_rank, dropout, kaiming, register, zeros
from ..weights import dense_weight


@dataclass
class DeLoRAConfig(AdapterConfig):
    lambda0: float = 15.0  # initial λ, the bound on ‖ΔW‖ per unit column norm (PEFT's delora_lambda)

    def __post_init__(self):
        super().__post_init__()
        check_number("DeLoRA lambda0", self.lambda0)


def _scaled_A(layer):
    """diag(λ / r / (‖a_i‖ ‖b_i‖)) A diag(w): (r, d_in)."""
    A, B = layer.lora_A, layer.lora_B
    norms = A.norm(dim=1).clamp(min=1e-4) * B.norm(dim=0).clamp(min=1e-4)  # (r,)
    per_rank = layer.lora_lambda / layer.lora_config.r / norms
    return A * per_rank[:, None] * layer.lora_wnorm[None, :]


@register
class DeLoRA(Variant):
    name = "delora"
    config = DeLoRAConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), kaiming), "lora_B": ParamSpec((d_out, cfg.r), zeros),
                "lora_lambda": ParamSpec((1,), lambda t: t.fill_(cfg.lambda0)),
                "lora_wnorm": ParamSpec((d_in,), as_buffer=True)}

    @staticmethod
    def init(layer, cfg):
        layer.lora_wnorm.copy_(dense_weight(layer).norm(dim=0))

    @staticmethod
    def forward(layer, x, y):
        return add_low_rank(y, dropout(layer, x), _scaled_A(layer), layer.lora_B, 1.0)

    @staticmethod
    def lora_factors(layer):
        return _scaled_A(layer), layer.lora_B, 1.0

    @staticmethod
    def dead_reason(layer):
        return None if layer.lora_wnorm.any() else "the weight is all zero, so its column norms zero every gradient"

    @staticmethod
    def check_tensors(tensors, cfg):
        return ["lora_wnorm"] if bool((tensors["lora_wnorm"] < 0).any()) else []  # a norm is never negative
