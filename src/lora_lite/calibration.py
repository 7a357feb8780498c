"""Calibration passes for `group_init`: run the model over the user's batches and hand each target layer's
inputs to the variant, with hooks that never outlive the pass."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def run_batches(model: nn.Module, data: Iterable) -> None:
    """Run `model` over calibration batches without gradients: dicts go in as keyword arguments."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in data:
            if isinstance(batch, dict):
                model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            elif isinstance(batch, (tuple, list)):
                model(*[v.to(device) if torch.is_tensor(v) else v for v in batch])
            else:
                model(batch.to(device))


def capture_inputs(model: nn.Module, layers: list[nn.Module], data: Iterable,
                   fn: Callable[[nn.Module, torch.Tensor], None]) -> None:
    """Call `fn(layer, x)` with each layer's input on every calibration batch.

    The hooks are temporary: removed when the pass ends, also on error.
    """
    handles = [layer.register_forward_pre_hook(lambda m, args: fn(m, args[0])) for layer in layers]
    try:
        run_batches(model, data)
    finally:
        for h in handles:
            h.remove()
