"""The hot path of one adapted layer, counted (never timed): kernels, autograd nodes and temporaries.

For the MLP's up projection of the first block (d -> 3d, the batch's tokens) of the frozen base, of ours and
of the reference: the kernels the forward and the backward launch (on the CPU the aten ops that move data
themselves: views, and composites whose work a child op does, left out; on CUDA the device kernels), the
autograd nodes the output hangs from, and the bytes the forward and the backward allocate, beside the memory
floor's bytes for that layer. What is over the floor is what a faster hot path could still remove.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

LAYER = "model.layers.0.mlp.up_proj"
VIEWS = {"aten::view", "aten::t", "aten::transpose", "aten::expand", "aten::as_strided", "aten::reshape",
         "aten::_reshape_alias", "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided",
         "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::slice", "aten::select", "aten::lift_fresh",
         "aten::_unsafe_view", "aten::resolve_conj", "aten::resolve_neg", "aten::empty_like", "aten::unbind"}


def layer_of(model) -> torch.nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    return inner.get_submodule(LAYER)


def nodes(fn) -> int:
    seen, todo = set(), [fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return len(seen)


def moves_data(event) -> bool:
    return event.name.startswith("aten::") and event.name not in VIEWS


def counted(fn, device: str) -> tuple[int, int]:
    """(kernels, bytes allocated) while fn() runs."""
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = prof.events()
    if cuda:
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:  # an op that moves data itself: none of its children does (aten::mm's children are resolve_conj)
        kernels = sum(1 for e in events if moves_data(e) and not any(moves_data(c) for c in e.cpu_children))
    allocated = sum(n for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                    for n in [e.nbytes()] if n > 0)
    return kernels, allocated


def profile_layer(model, tokens_shape: tuple[int, int], device: str) -> dict:
    layer = layer_of(model)
    dtype = layer.weight.dtype
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(*tokens_shape, layer.in_features, generator=g, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(*tokens_shape, layer.out_features, generator=g, device=device, dtype=dtype)
    model.train()
    out = {}
    out["forward_kernels"], out["forward_bytes"] = counted(lambda: out.setdefault("y", layer(x)), device)
    y = out.pop("y")
    out["autograd_nodes"] = nodes(y.grad_fn)
    out["backward_kernels"], out["backward_bytes"] = counted(lambda: y.backward(grad), device)
    return out


def hot_path(models: dict, tokens_shape: tuple[int, int], device: str) -> dict:
    """profile_layer for base, ours and ref, plus the floor's bytes for that one layer (train step)."""
    rows = {k: profile_layer(m, tokens_shape, device) for k, m in models.items()}
    layer = layer_of(models["base"])
    tokens = tokens_shape[0] * tokens_shape[1]
    rows["floor_bytes"] = layer.weight.element_size() * tokens * 3 * (layer.in_features + layer.out_features)
    return rows
