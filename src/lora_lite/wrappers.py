"""Wrappers around a model: torch.compile's OptimizedModule, DDP / DataParallel, FSDP2's fully_shard.

`unwrap` gives the module users think of; `check_order` refuses an adapter added after a wrapper has
captured the model. Nothing here rewrites key strings: a model whose own child is named `module` or
`_orig_mod` keeps that name, because only real wrapper objects are looked through.
"""
from __future__ import annotations

from torch import nn

DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def is_compiled(module: nn.Module) -> bool:
    """torch.compile(model) returns an OptimizedModule; model.compile() sets a compiled call in place."""
    return (type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)
            ) or getattr(module, "_compiled_call_impl", None) is not None


def unwrap(model: nn.Module) -> nn.Module:
    """The module users think of: strips torch.compile's OptimizedModule and DDP/DataParallel's `.module`."""
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, DATA_PARALLEL):
            model = model.module
        else:
            return model


def wrapper_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The key prefixes the wrappers around `model` add to its state_dict, outermost first."""
    prefixes = []
    while model is not unwrap(model):
        if isinstance(model, DATA_PARALLEL):
            prefixes.append("module.")
            model = model.module
        else:
            prefixes.append("_orig_mod.")
            model = model._orig_mod
    return tuple(prefixes)


def _is_sharded(module: nn.Module) -> bool:
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__) or any(
        type(p).__name__ == "DTensor" for p in module.parameters(recurse=False))


def check_order(model: nn.Module) -> None:
    """Refuse a model already wrapped by DDP, sharded by fully_shard or compiled.

    Each captures the model as it was: DDP builds its gradient all-reduce for the parameters it
    saw, FSDP2 shards only those, and dynamo does not guard on module hooks
    (`torch._dynamo.config.skip_nnmodule_hook_guards`). An adapter added afterwards would train
    without sync (ranks silently diverge) or not be guaranteed to run, so the order is enforced.
    """
    then = "attach (or load) the adapter first, then wrap: ll.attach(model, cfg); model = {}(model)"
    for name, sub in model.named_modules():  # the wrappers themselves included, DataParallel looked through
        where = f"module {name}" if name else "the model"
        if isinstance(sub, nn.parallel.DistributedDataParallel):
            raise ValueError(f"{where} is already wrapped in DistributedDataParallel, whose gradient all-reduce "
                             f"covers only the parameters it saw, so adapter gradients would never be synced "
                             f"and ranks would silently diverge: " + then.format("DDP"))
        if is_compiled(sub):
            raise ValueError(f"{where} is already torch.compile'd; dynamo does not guard on forward hooks, so an "
                             f"adapter added now is not guaranteed to run: " + then.format("torch.compile"))
        if _is_sharded(sub):
            raise ValueError(f"{where} is already sharded by fully_shard (FSDP2), which shards only the "
                             f"parameters it saw: " + then.format("fully_shard"))
