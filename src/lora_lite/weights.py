"""The one place that knows how a linear-like layer stores its weight.

Supported: nn.Linear (W is (d_out, d_in)), transformers' Conv1D (GPT-2; stored
transposed as (d_in, d_out), `nf` outputs), bitsandbytes Linear4bit (packed
uint8 + quant_state) and Linear8bitLt (int8 + per-row scales SCB).
"""
from __future__ import annotations

import torch
from torch import nn


def is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and hasattr(layer, "weight")


def is_linear_like(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear) or is_conv1d(layer):
        return True
    # bitsandbytes-style and other structural linears
    return (isinstance(getattr(layer, "in_features", None), int)
            and isinstance(getattr(layer, "out_features", None), int)
            and isinstance(getattr(layer, "weight", None), torch.Tensor))


def dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like layer, whatever the storage (a 4-bit weight's shape is the packed one)."""
    if is_conv1d(layer):
        return layer.weight.shape[0], layer.nf
    return layer.in_features, layer.out_features


def is_quantized(layer: nn.Module) -> bool:
    w = layer.weight
    return getattr(w, "quant_state", None) is not None or not w.dtype.is_floating_point


def _int8_scales(layer: nn.Module) -> torch.Tensor:
    # bitsandbytes keeps the row scales on the weight until the first forward, then on layer.state
    scb = getattr(layer.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(layer, "state", None), "SCB", None)
    if scb is None:
        raise ValueError(f"int8 layer {type(layer).__name__} has no SCB scales: was it quantized (moved to a device)?")
    return scb


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense float32 (d_out, d_in) tensor (dequantized when needed; never a view)."""
    w = layer.weight
    if is_conv1d(layer):
        return w.detach().t().float().clone()
    quant_state = getattr(w, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, quant_state).float().reshape(dims(layer)[::-1])
    if w.dtype == torch.int8:
        return w.data.float() * (_int8_scales(layer).float()[:, None] / 127.0)
    return w.detach().float().clone()


def add_to_weight(layer: nn.Module, delta: torch.Tensor) -> None:
    """W += delta, with delta (d_out, d_in), in the layer's storage orientation and dtype. Float weights only."""
    if is_quantized(layer):
        raise TypeError(f"cannot write into a quantized {type(layer).__name__} weight")
    w = layer.weight
    with torch.no_grad():
        w.add_((delta.t() if is_conv1d(layer) else delta).to(w.dtype))
