"""Where adapter state lives: on the target layers themselves, recorded so that detach removes only it.

Attach registers `lora_*` tensors and attributes on each target layer and lists every name it added in
the layer's `lora_added` record (the record itself included), appended as each one is added, so a
failure half-way through a layer leaves a record that names exactly what to remove. A user's own
`lora_*` attribute is not in the record and survives detach. Variants keep runtime flags in the
per-layer dict `lora_state`, which attach adds like any other attribute.
"""
from __future__ import annotations

import torch
from torch import nn

from .wrappers import unwrap

ADDED = "lora_added"  # per layer: names of the tensors and attributes attach added
FLAGS = "lora_requires_grad"  # on the root: {parameter name: requires_grad before attach}
REPACK = "lora_cpu_repack"  # on the root: bitsandbytes CPU-repack switches held off while attached
CONFIG = "lora_model_config"  # on the root: the config attach was given (layers hold their own r and alpha)
ORIGINALS = "lora_originals"  # on the root: {modules_to_save path: {state_dict key: value before attach}}
HITS = "lora_pattern_hits"  # on the root: {target_names pattern: modules it selected}, from attach
WATCH = "lora_watch"  # on the root until its first forward: [(name, adapted layer, its caller)]
RAN = "lora_ran"  # on a watched module whose forward ran during that first forward
DISABLED = "disabled"  # in an adapted layer's lora_state inside ll.disabled: how many disabled blocks hold it


def adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(canonical name, layer) of every layer that carries an adapter (or part of one), in model order."""
    return [(n, m) for n, m in unwrap(model).named_modules() if ADDED in m.__dict__]


def model_config(root: nn.Module):
    """The config the adapter was attached with; each layer's `lora_config` holds that layer's r and alpha."""
    layers = adapted_layers(root)
    return root.__dict__.get(CONFIG) or (layers[0][1].lora_config if layers else None)


def saved_modules(root: nn.Module) -> dict[str, nn.Module]:
    """{path: module} of the modules_to_save trained beside the adapter (modules_to_save.py)."""
    return {path: root.get_submodule(path) for path in root.__dict__.get(ORIGINALS, {})}


def lora_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's parameters and buffers on `layer`, by short name."""
    added = layer.__dict__.get(ADDED, ())
    return {k: v for store in (layer._parameters, layer._buffers) for k, v in store.items()
            if k in added and v is not None}


def full_key(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def record(layer: nn.Module, name: str) -> None:
    """Note that attach added `name` to `layer` (called before adding it, so a failure still leaves it noted)."""
    layer.__dict__.setdefault(ADDED, [ADDED]).append(name)


def set_attr(layer: nn.Module, name: str, value) -> None:
    record(layer, name)
    layer.__dict__[name] = value


def remove_added(layer: nn.Module) -> None:
    """Remove what attach added to `layer`, the record last, so an interrupted removal can be repeated."""
    added = layer.__dict__.get(ADDED, [])
    for name in [n for n in added if n != ADDED]:
        layer._parameters.pop(name, None)
        layer._buffers.pop(name, None)
        layer._non_persistent_buffers_set.discard(name)
        layer.__dict__.pop(name, None)
    layer.__dict__.pop(ADDED, None)


def clashes(layer: nn.Module, names) -> list[str]:
    """The names in `names` that `layer` already has as a parameter, buffer, submodule or attribute."""
    return [n for n in names if n in layer._parameters or n in layer._buffers or n in layer._modules
            or n in layer.__dict__ or hasattr(type(layer), n)]
