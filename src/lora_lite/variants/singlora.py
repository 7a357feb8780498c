"""SingLoRA: one symmetric low-rank matrix (Bensaïd et al. 2025, https://arxiv.org/abs/2507.05566).

    h = W x + u(t) · s · A[:d_out] (A[:d_in]ᵀ dropout(x)),   u(t) = min(t / T, 1),  s = alpha / r

A (max(d_in, d_out), r) is the only trainable tensor (Kaiming); ΔW = A[:d_out] A[:d_in]ᵀ is A Aᵀ on square
layers. Identity at t=0 is exact: u(0) = 0 (T = ramp_up_steps; T = 0: u = 1 from the start). The step t is
the int64 buffer lora_step (a float counter stalls at 256 in bf16), driven by on_step. The forward stays low
rank, O(r (d_in + d_out)) per token, where peft_singlora 0.2.0 (`peft_singlora/layer.py`, `_get_update_weight`,
checked against in tests/test_singlora.py) builds the dense update every forward.
"""
import warnings
from dataclasses import dataclass

import torch

from ..config import INT64_MAX, AdapterConfig
from ..variant import ParamSpec, Variant, add_low_rank, dropout, kaiming, register
from ..weights import dims

STEP_0 = ("SingLoRA is training at step 0, where its ramp u(t) = min(t / ramp_up_steps, 1) is 0: the adapter outputs "
          "nothing and gets zero gradient. Call ll.track_steps(optimizer, model) after creating the optimizer, or "
          "ll.set_step(model, step) in your loop; under transformers' Trainer use lora_lite.hf.AdapterCallback().")


@dataclass
class SingLoRAConfig(AdapterConfig):
    ramp_up_steps: int = 1000  # T; 0: no ramp


def ramp(layer) -> torch.Tensor | float:
    T = layer.lora_config.ramp_up_steps
    return layer.lora_step.double().div(T).clamp(max=1.0).to(layer.lora_A.dtype) if T else 1.0


def rows(A: torch.Tensor, n: int) -> torch.Tensor:
    return A if n == A.shape[0] else A[:n]  # a full slice would still cost a backward node


def _check_step(layer) -> None:
    layer.lora_state["checked"] = True
    if layer.lora_config.ramp_up_steps and not layer.lora_state.get("driven") and int(layer.lora_step) == 0:
        warnings.warn(STEP_0)


@register
class SingLoRA(Variant):
    name = "singlora"
    config = SingLoRAConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((max(d_in, d_out), cfg.r), kaiming),
                "lora_step": ParamSpec((), None, trainable=False, as_buffer=True, dtype=torch.int64)}

    @staticmethod
    def forward(layer, x, y):
        A = layer.lora_A  # Aᵀ copied contiguous (r × d_in, a few KB): the products see LoRA's layout of A
        At = rows(A, x.shape[-1]).t().contiguous()  # (r, d_in)
        if At.requires_grad and "checked" not in layer.lora_state and not torch.compiler.is_compiling():
            At.register_hook(lambda grad: _check_step(layer))  # once per layer: the first backward, one host sync
        return add_low_rank(y, dropout(layer, x), At, rows(A, y.shape[-1]) * ramp(layer),
                            layer.lora_config.alpha / layer.lora_config.r)

    @staticmethod
    def lora_factors(layer):  # the current ramp goes into B: the schedule itself does not travel
        (d_in, d_out), A, cfg = dims(layer), layer.lora_A, layer.lora_config
        return A[:d_in].t(), A[:d_out] * ramp(layer), cfg.alpha / cfg.r

    @staticmethod
    def on_step(layer, step):
        t = layer.lora_step  # advancing stops at the int64 maximum instead of wrapping negative (no host sync)
        t.add_(t < INT64_MAX) if step is None else t.fill_(step)

    @staticmethod
    def on_schedule(layer):  # step 0 until the first optimizer step is then expected
        layer.lora_state["driven"] = True

    @staticmethod
    def check_tensors(tensors, cfg):
        return ["lora_step"] if int(tensors["lora_step"]) < 0 else []  # a negative ramp flips the update
