"""The forward hooks attach adds: the adapter hook on each target layer, the input-gradient hook on
the input embedding that makes reentrant gradient checkpointing train the adapters, and the first-forward
watch that warns when an adapted layer's forward never ran (its weight used directly by its caller).

Both are module-level functions that read everything from the module they run on (no closures), so
`copy.deepcopy` of a hooked model is an independent, working copy, and both are found by identity on
removal, so no handle needs keeping.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from .state import ADDED, DISABLED, RAN, WATCH


def adapter_hook(layer: nn.Module, args: tuple, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    """Run the layer's variant on its input and output; the layer's own forward is untouched."""
    # inside ll.disabled: the layer's own output. A key test on lora_state, which dynamo guards (it would not
    # guard a read of layer.__dict__), on presence only: nested blocks change the count, not the graph
    if DISABLED in layer.lora_state:
        return None
    x = args[0] if args else next(iter(kwargs.values()))  # whatever the input is called (Conv1D: `x`)
    # the adapter computes in its parameters' dtype: cfg.dtype at attach, or what model.to(...) made of it
    added = layer.__dict__[ADDED]
    dtype = next((p.dtype for k, p in layer._parameters.items() if k in added), layer.lora_config.dtype)
    # Variants add into y in place (add_low_rank). y is fresh from the layer unless a hook ran before ours
    # and may hold it (a tracer, FSDP), or it is a view (Conv1D, bitsandbytes' autograd Function, where
    # autograd forbids or slows in-place writes): then they get a copy. Compiled graphs add out of place.
    shared = not torch.compiler.is_compiling() and (
        y._is_view() or bool(_global_forward_hooks) or next(iter(layer._forward_hooks.values())) is not adapter_hook)
    return layer.lora_variant.forward(layer, x.to(dtype), y.to(dtype, copy=shared)).to(y.dtype)


def inputs_require_grad(embedding: nn.Module, args: tuple, out: torch.Tensor) -> None:
    """Forward hook on the input embedding of a model that has `get_input_embeddings` (transformers).

    Reentrant gradient checkpointing (`use_reentrant=True`) records a block only when one of its
    inputs requires grad; with the whole base frozen none does, so the adapters inside it would
    silently get no gradient. Marking the embedding output makes that work whether checkpointing is
    enabled before or after attach. It is what transformers' `enable_input_require_grads` does, but
    only while a block checkpoints (marking costs the first block's input gradients, ~3% of a train
    step). Skipped while dynamo traces: it would be a graph break.
    """
    if (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and not out.requires_grad
            and any(m.gradient_checkpointing for m in embedding.lora_checkpointable)
            and not torch.compiler.is_compiling()):
        out.requires_grad_(True)


def input_embeddings(root: nn.Module) -> nn.Module | None:
    get = getattr(root, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except NotImplementedError:
        return None
    return embedding if isinstance(embedding, nn.Module) else None


def remove_hooks(module: nn.Module, fn) -> None:
    """Remove every forward hook `fn` from `module` (torch keeps no public way to find a hook by function)."""
    for key in [k for k, f in module._forward_hooks.items() if f is fn]:
        for hooks in (module._forward_hooks, module._forward_hooks_with_kwargs, module._forward_hooks_always_called):
            hooks.pop(key, None)


def remove_pre_hooks(module: nn.Module, fn) -> None:
    for key in [k for k, f in module._forward_pre_hooks.items() if f is fn]:
        module._forward_pre_hooks.pop(key, None)
        module._forward_pre_hooks_with_kwargs.pop(key, None)


def _caller(root: nn.Module, name: str) -> nn.Module:
    """The module whose forward calls `name`: its nearest ancestor that has a forward (ModuleList has none)."""
    while name:
        name = name.rpartition(".")[0]
        module = root.get_submodule(name)
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            return module
    return root


def watch(root: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """Note, during the next forward of `root` only, which adapted layers and callers run (cost: one pre-hook
    call per module in that one forward; the adapter hook itself is untouched)."""
    entries = [(name, layer, _caller(root, name) if name else None) for name, layer in layers]
    root.__dict__[WATCH] = entries  # a plain list: copy.deepcopy maps its modules with the model
    for module in {id(m): m for _, layer, caller in entries for m in (layer, caller) if m is not None}.values():
        module.register_forward_pre_hook(mark_ran)
    root.register_forward_hook(check_bypassed)


def unwatch(root: nn.Module) -> None:
    for module in root.modules():
        remove_pre_hooks(module, mark_ran)
        module.__dict__.pop(RAN, None)
    remove_hooks(root, check_bypassed)
    root.__dict__.pop(WATCH, None)


def mark_ran(module: nn.Module, args: tuple) -> None:
    if not torch.compiler.is_compiling():  # a traced graph would keep the write forever
        module.__dict__[RAN] = True


def check_bypassed(root: nn.Module, args: tuple, out) -> None:
    """After the first forward: warn about adapted layers whose caller ran but whose own forward did not.

    Their caller reads their weight directly (a functional call, a fused kernel), so their adapter changes
    nothing and gets no gradient. A layer whose caller did not run either (a vision tower in a text-only
    batch, an expert no token was routed to) is not reported: nothing bypassed it."""
    if torch.compiler.is_compiling():
        return
    missed = [name for name, layer, caller in root.__dict__.get(WATCH, ())
              if RAN not in layer.__dict__ and (caller is None or RAN in caller.__dict__)]
    unwatch(root)
    if missed:
        warnings.warn(f"the adapters on {', '.join(missed[:20])} ({len(missed)} layers) did not run in the first "
                      f"forward of {type(root).__name__}, though their callers did: the model uses those layers' "
                      f"weights without calling them (a functional call or a fused kernel), so these adapters "
                      f"change nothing and get no gradient. Leave them out (exclude_names)", stacklevel=2)
