"""Merge: fold each adapted layer's `delta_weight` into its float base weight, then detach."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .lifecycle import detach
from .state import ORIGINALS, adapted_layers, full_key
from .weights import add_to_weight, is_quantized
from .wrappers import unwrap


def _tied_elsewhere(root: nn.Module) -> dict[int, set[str]]:
    """id(parameter) -> the parameter paths that reach it through a *different* module (a true tie)."""
    owners: dict[int, set[str]] = defaultdict(set)
    for mname, m in root.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            owners[id(p)].add((id(m), full_key(mname, pname)))
    return owners


def _check(name: str, layer: nn.Module, owners) -> None:
    others = sorted(path for mid, path in owners.get(id(layer.weight), ()) if mid != id(layer))
    if others:
        raise ValueError(f"the weight of {name} is tied to {others}: merging would change those too. "
                         f"Untie it first (e.g. clone the weight) or keep the adapter unmerged")
    if is_quantized(layer):
        raise TypeError(f"cannot merge into quantized layer {name} ({type(layer).__name__}): load the base "
                        f"model in float, then ll.load(model, adapter_file) and ll.merge(model)")
    delta = layer.lora_variant.delta_weight(layer).to(layer.weight.dtype)
    if not torch.isfinite(delta).all():
        raise ValueError(f"the update of {name} is not finite (NaN or Inf) in {layer.weight.dtype}: nothing was merged")


def merge(model: nn.Module) -> None:
    """Fold each layer's delta_weight into its float base weight, then remove the adapter.

    Checked before any weight is written: every layer is float (not quantized), untied, its variant
    has delta_weight, and the update is finite in the weight's dtype. A module reached by two paths is
    one module, merged once.
    """
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("nothing to merge: no adapter is attached to this model")
    owners = _tied_elsewhere(unwrap(model))
    with torch.no_grad():
        for name, layer in layers:
            _check(name, layer, owners)
        for _, layer in layers:  # computed again rather than kept: all deltas at once would double the model
            add_to_weight(layer, layer.lora_variant.delta_weight(layer))
    unwrap(model).__dict__.pop(ORIGINALS, None)  # the modules_to_save keep their trained values
    detach(model)
