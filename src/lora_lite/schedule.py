"""The training step of step-scheduled variants (SingLoRA's ramp): set it, or advance it with the optimizer."""
from __future__ import annotations

import operator

import torch
from torch import nn

from .config import INT64_MAX
from .state import adapted_layers
from .wrappers import unwrap


def set_step(model: nn.Module, step: int) -> None:
    """Set the training step of every adapted layer (variants without a schedule ignore it).

    Checked before any layer is touched: a refused step changes nothing.
    """
    try:
        step = operator.index(step)  # ints, numpy ints, integer 0-d tensors; not floats or strings
    except TypeError:
        raise TypeError(f"step must be an int, got {step!r}") from None
    if not 0 <= step <= INT64_MAX:
        raise ValueError(f"step must be >= 0 and < 2**63 (an int64), got {step}")
    for _, layer in adapted_layers(model):
        layer.lora_variant.on_schedule(layer)
        layer.lora_variant.on_step(layer, step)


def track_steps(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Advance every adapted layer's step by one after each real `optimizer.step()`.

    Returns the hook's handle (`.remove()` stops tracking). Gradient accumulation needs
    nothing more: the step counts optimizer steps, not forwards.
    """
    root = unwrap(model)
    for _, layer in adapted_layers(root):
        layer.lora_variant.on_schedule(layer)

    def advance(opt, args, kwargs):
        for _, layer in adapted_layers(root):
            layer.lora_variant.on_step(layer, None)

    return optimizer.register_step_post_hook(advance)
