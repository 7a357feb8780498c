"""SingLoRA: one symmetric low-rank matrix (Bensaïd et al. 2025, https://arxiv.org/abs/2507.05566).

    h = W x + u(t) · s · A[:d_out] (A[:d_in]ᵀ dropout(x)),   u(t) = min(t / T, 1),  s = alpha / r

A (max(d_in, d_out), r) is the only trainable tensor (Kaiming, bound 1/sqrt(r)); ΔW = A[:d_out] A[:d_in]ᵀ
is A Aᵀ on square layers and its top-left block otherwise. Identity at t=0 is exact: u(0) = 0.
T = ramp_up_steps; T = 0 means u = 1 from the start. The step t is the persistent int64 buffer
lora_step (a float counter stalls at 256 in bf16), advanced by ll.track_steps / ll.set_step (on_step).
The forward stays low rank, O(r (d_in + d_out)) per token; u is a tensor, so no host sync.

Checked against peft_singlora 0.2.0 `peft_singlora/layer.py` (`SingLoRALayer._get_update_weight`),
which rebuilds the dense d_out x d_in update every forward (tests/test_singlora.py).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..config import AdapterConfig, check_int
from ..variant import ParamSpec, dropout, kaiming, register
from ..weights import dims
from .lora import add_low_rank

STEP_0 = ("SingLoRA is training at step 0, where its ramp u(t) = min(t / ramp_up_steps, 1) is 0: the adapter "
          "outputs nothing and gets zero gradient. Call ll.track_steps(optimizer, model) once after creating the "
          "optimizer, or ll.set_step(model, step) in your loop.")


@dataclass
class SingLoRAConfig(AdapterConfig):
    ramp_up_steps: int = 1000

    def __post_init__(self):
        super().__post_init__()
        check_int("ramp_up_steps (0: no ramp)", self.ramp_up_steps, 0)


def ramp(layer) -> torch.Tensor | float:
    T = layer.lora_config.ramp_up_steps
    return layer.lora_step.float().div(T).clamp(max=1.0) if T else 1.0


def rows(A: torch.Tensor, n: int) -> torch.Tensor:
    """A[:n], or A itself when that is all of it: a full slice would still cost a backward node."""
    return A if n == A.shape[0] else A[:n]


def _check_step(layer, grad) -> None:
    # Runs as a backward hook on the first training backward of each layer: the one moment gradients
    # really flow (a forward alone, e.g. an identity check before ll.track_steps, says nothing). It is
    # registered in forward only while the layer's flag is unset, so the hot path then costs one dict
    # lookup and no host sync; the single step read happens here, once per layer. The flag lives in
    # layer.__dict__ (deepcopy keeps it, detach removes it; a loaded step > 0 passes). ll.track_steps
    # marks layers at registration: step 0 before its first optimizer step is expected. The message is
    # the same for every layer, so Python's default warning filter shows it once.
    layer.lora_step_checked = True
    if (layer.lora_config.ramp_up_steps and not layer.__dict__.get("lora_steps_tracked")
            and int(layer.lora_step) == 0):
        warnings.warn(STEP_0)


@register
class SingLoRA:
    name = "singlora"
    config = SingLoRAConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((max(d_in, d_out), cfg.r), kaiming),
                "lora_step": ParamSpec((), None, trainable=False, as_buffer=True, dtype=torch.int64)}

    @staticmethod
    def forward(layer, x, y):
        A = layer.lora_A
        A_in, A_out = rows(A, x.shape[-1]), rows(A, y.shape[-1])
        # Aᵀ copied contiguous, (r, d_in) and a few KB, so autograd forms A's gradient as gᵀ x, the fast
        # layout (x @ A[:d_in] would form xᵀ g, twice as slow on CPU); the ramp scales the small B side.
        h = F.linear(dropout(layer, x), A_in.t().contiguous())  # (..., r)
        if (h.requires_grad and A.requires_grad and "lora_step_checked" not in layer.__dict__
                and not torch.compiler.is_compiling()):
            h.register_hook(partial(_check_step, layer))
        return add_low_rank(y, h, A_out * ramp(layer), layer.lora_config.alpha / layer.lora_config.r)

    @staticmethod
    def delta_weight(layer):
        d_in, d_out = dims(layer)
        A, cfg = layer.lora_A, layer.lora_config
        return (ramp(layer) * cfg.alpha / cfg.r) * (A[:d_out] @ A[:d_in].t())

    @staticmethod
    def on_step(layer, step):
        """step None: advance by one (after an optimizer step); an int: set it."""
        layer.lora_step_checked = True  # the user drives the schedule: no step-0 warning
        if step is None:
            layer.lora_step.add_(1)
        elif step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        else:
            layer.lora_step.fill_(step)
