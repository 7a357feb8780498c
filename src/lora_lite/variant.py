"""The variant contract: ParamSpec, the registry, and small helpers variants share.

A variant is a class of static methods (no state): `param_specs`, `forward`, and
optionally `init`, `group_init`, `delta_weight`, `on_step`. Its tensors live on
the target layer as `lora_*` parameters and buffers. See DESIGN.md.

`forward(layer, x, y)` gets x and y in the adapter's dtype and returns the new output. It may
write into y: the runtime hands it a y that nothing else holds (a copy when another hook saw it
first), which saves allocating a second (..., d_out) tensor per call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import CONFIGS, AdapterConfig


@dataclass(frozen=True)
class ParamSpec:
    """Shape and in-place initialiser of one adapter tensor.

    `init(t)` fills `t` in place (None leaves zeros, for tensors that the
    variant's `init` computes). `dtype` None means the config's adapter dtype.
    """

    shape: tuple[int, ...]
    init: Callable[[torch.Tensor], object] | None = None
    trainable: bool = True
    as_buffer: bool = False
    dtype: torch.dtype | None = None


def zeros(t: torch.Tensor) -> None:
    nn.init.zeros_(t)


def kaiming(t: torch.Tensor) -> None:
    """What nn.Linear does to its weight: uniform with bound 1/sqrt(fan_in), fan_in = t.shape[1]."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def dropout(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The config's input dropout; returns x itself (no copy) when p is 0 or in eval mode."""
    p = layer.lora_config.dropout
    return F.dropout(x, p, True) if p and layer.training else x


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a variant to REGISTRY and tie its config class to its name."""
    for attr in ("name", "config", "param_specs", "forward"):
        if not hasattr(cls, attr):
            raise TypeError(f"variant {cls.__name__} lacks required attribute {attr!r}")
    if not issubclass(cls.config, AdapterConfig):
        raise TypeError(f"{cls.__name__}.config must subclass AdapterConfig")
    cls.config.variant = cls.name
    REGISTRY[cls.name] = cls
    CONFIGS[cls.name] = cls.config
    return cls


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
