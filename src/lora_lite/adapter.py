"""The runtime: attach, detach, save, load, merge, summary, set_step, track_steps.

It knows no variant by name. All adapter state lives on the target layers
(`lora_*` parameters and buffers, plus `lora_config` and `lora_variant`
attributes) and one forward hook per layer, the module-level `_hook`, which
reads everything from the layer it runs on; so `copy.deepcopy` of a hooked
model is an independent, working copy. The root module keeps the base
parameters' `requires_grad` flags from before attach, for detach to restore.
"""
from __future__ import annotations

import contextlib
import json
import operator
import os
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from . import __version__
from .config import AdapterConfig, from_dict
from .target import Target, candidates, select, unwrap
from .variant import REGISTRY, ParamSpec
from .weights import (add_to_weight, dims, hold_cpu_repack, is_cpu_repacked, is_linear_like, is_quantized,
                      release_cpu_repack)

FLAGS = "lora_requires_grad"  # root attribute: {param name: requires_grad before attach}
REPACK = "lora_cpu_repack"  # root attribute: bitsandbytes CPU-repack switches held off while attached


def _hook(layer: nn.Module, args: tuple, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    x = args[0] if args else kwargs["input"]
    # the adapter computes in its parameters' dtype: cfg.dtype at attach, or what model.to(...) made of it
    dtype = next((p.dtype for k, p in layer._parameters.items() if k.startswith("lora_")), layer.lora_config.dtype)
    # Variants add into y in place (lora.add_low_rank). y is fresh from the layer unless a hook ran
    # before ours and may hold it (a tracer, FSDP), or it is a view (Conv1D, bitsandbytes' autograd
    # Function, where autograd forbids or slows in-place writes): then they get a copy. Compiled
    # graphs add out of place (add_low_rank) and the compiler fuses.
    shared = not torch.compiler.is_compiling() and (
        y._is_view() or bool(_global_forward_hooks) or next(iter(layer._forward_hooks.values())) is not _hook)
    return layer.lora_variant.forward(layer, x.to(dtype), y.to(dtype, copy=shared)).to(y.dtype)


def _inputs_require_grad(embedding: nn.Module, args: tuple, out: torch.Tensor) -> None:
    """Forward hook on the input embedding of a model that has `get_input_embeddings` (transformers).

    Reentrant gradient checkpointing (`use_reentrant=True`) records a block only when one of its
    inputs requires grad; with the whole base frozen none does, so the adapters inside it would
    silently get no gradient. Marking the embedding output makes that work whether checkpointing is
    enabled before or after attach. It is what transformers' `enable_input_require_grads` does, but
    only while a block checkpoints (marking costs the first block's input gradients, ~3% of a train
    step), and this hook is found by identity on detach (no handle to keep), so detach stays exact
    and `copy.deepcopy` works. Skipped while dynamo traces: it would be a graph break.
    """
    if (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and not out.requires_grad
            and any(m.gradient_checkpointing for m in embedding.lora_checkpointable)
            and not torch.compiler.is_compiling()):
        out.requires_grad_(True)


def _input_embeddings(root: nn.Module) -> nn.Module | None:
    get = getattr(root, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except NotImplementedError:
        return None
    return embedding if isinstance(embedding, nn.Module) else None


def _remove_hooks(module: nn.Module, fn) -> None:
    for key in [k for k, f in module._forward_hooks.items() if f is fn]:
        for hooks in (module._forward_hooks, module._forward_hooks_with_kwargs, module._forward_hooks_always_called):
            hooks.pop(key, None)


@dataclass
class Handle:
    """What attach returns: the model, its config and targets; also a context manager that detaches."""

    model: nn.Module
    config: AdapterConfig
    targets: list[Target]

    def detach(self) -> None:
        detach(self.model)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(canonical name, layer) of every layer that carries an adapter, in model order."""
    return [(n, m) for n, m in unwrap(model).named_modules() if "lora_config" in m.__dict__]


def _variant(cfg: AdapterConfig) -> type:
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"expected an AdapterConfig (e.g. ll.LoRAConfig(...)), got {type(cfg).__name__}")
    if cfg.variant not in REGISTRY:
        raise ValueError(f"unknown variant {cfg.variant!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[cfg.variant]


def _specs(variant: type, t: Target, cfg: AdapterConfig) -> dict[str, ParamSpec]:
    try:
        specs = variant.param_specs(t.d_in, t.d_out, cfg)
    except ValueError as e:
        raise ValueError(f"{e} (layer {t.name}, {t.d_in}->{t.d_out})") from None
    bad = [k for k in specs if not k.startswith("lora_")]
    if bad:
        raise TypeError(f"variant {variant.name} declares tensors {bad}: names must start with 'lora_'")
    return specs


def _check_free(root: nn.Module) -> None:
    if adapted_layers(root):
        raise ValueError("an adapter is already attached to this model: call ll.detach(model) first")


def _check_order(model: nn.Module) -> None:
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
        if hasattr(sub, "_orig_mod") or getattr(sub, "_compiled_call_impl", None) is not None:
            raise ValueError(f"{where} is already torch.compile'd; dynamo does not guard on forward hooks, so an "
                             f"adapter added now is not guaranteed to run: " + then.format("torch.compile"))
        if any(c.__name__ == "FSDPModule" for c in type(sub).__mro__) or any(
                type(p).__name__ == "DTensor" for p in sub.parameters(recurse=False)):
            raise ValueError(f"{where} is already sharded by fully_shard (FSDP2), which shards only the "
                             f"parameters it saw: " + then.format("fully_shard"))


def _attach(root: nn.Module, cfg: AdapterConfig, targets: list[Target], init: bool) -> None:
    """Add tensors and hooks to `targets` (all specs validated first). On error the model is restored."""
    variant = _variant(cfg)
    specs = [_specs(variant, t, cfg) for t in targets]
    repacked = [n for n, m in root.named_modules() if is_linear_like(m) and is_cpu_repacked(m)]
    if repacked:
        warnings.warn(f"bitsandbytes has repacked {_listing(repacked)} for its CPU inference kernel (an eval-mode, "
                      f"no-grad forward did it), which has no backward: gradients will not flow through those "
                      f"layers. To train, reload the base and attach before any eval-mode forward.")
    root.__dict__[FLAGS] = {n: p.requires_grad for n, p in root.named_parameters()}
    root.__dict__[REPACK] = hold_cpu_repack(root)
    try:
        for p in root.parameters():
            p.requires_grad_(False)
        for t, layer_specs in zip(targets, specs):
            layer = t.layer
            device = layer.weight.device
            for key, spec in layer_specs.items():
                tensor = torch.zeros(spec.shape, dtype=spec.dtype or cfg.dtype, device=device)
                if init and spec.init is not None:
                    spec.init(tensor)
                if spec.as_buffer:
                    layer.register_buffer(key, tensor)
                else:
                    layer.register_parameter(key, nn.Parameter(tensor, requires_grad=spec.trainable))
            layer.lora_config = cfg
            layer.lora_variant = variant
            if init and hasattr(variant, "init"):
                with torch.no_grad():
                    variant.init(layer, cfg)
            layer.register_forward_hook(_hook, with_kwargs=True)
        embedding = _input_embeddings(root)
        if embedding is not None:
            # the modules transformers' gradient_checkpointing_enable switches (a plain list: deepcopy maps it)
            embedding.lora_checkpointable = [m for m in root.modules() if hasattr(m, "gradient_checkpointing")]
            embedding.register_forward_hook(_inputs_require_grad)
    except BaseException:
        detach(root)
        raise


def attach(model: nn.Module, cfg: AdapterConfig, calibration_data=None) -> Handle:
    """Freeze `model`, add the adapter `cfg` describes to the layers it selects, and return a Handle.

    `calibration_data` (an iterable of batches: dicts of tensors, tuples or tensors) is passed
    to the variant's `group_init`, for data-calibrated initialisation.
    """
    _check_order(model)
    root = unwrap(model)
    variant = _variant(cfg)
    _check_free(root)
    targets = select(root, cfg)
    _attach(root, cfg, targets, init=True)
    if hasattr(variant, "group_init"):
        try:
            variant.group_init(root, targets, cfg, calibration_data)
        except BaseException:
            detach(root)
            raise
    return Handle(model, cfg, targets)


@contextlib.contextmanager
def attached(model: nn.Module, cfg: AdapterConfig, calibration_data=None):
    """`with ll.attached(model, cfg) as handle:` — the adapter is removed on exit, also on error."""
    handle = attach(model, cfg, calibration_data)
    try:
        yield handle
    finally:
        detach(model)


def detach(model: nn.Module) -> None:
    """Remove every adapter tensor, hook and attribute; restore requires_grad. No-op when nothing is attached."""
    root = unwrap(model)
    flags, held = root.__dict__.pop(FLAGS, None), root.__dict__.pop(REPACK, {})  # before a root layer is cleaned
    for module in root.modules():
        _remove_hooks(module, _inputs_require_grad)
        module.__dict__.pop("lora_checkpointable", None)
    for _, layer in adapted_layers(root):
        _remove_hooks(layer, _hook)
        for store in (layer._parameters, layer._buffers):
            for key in [k for k in store if k.startswith("lora_")]:
                del store[key]
        layer._non_persistent_buffers_set.difference_update(
            [k for k in layer._non_persistent_buffers_set if k.startswith("lora_")])
        for key in [k for k in layer.__dict__ if k.startswith("lora_")]:
            del layer.__dict__[key]
    release_cpu_repack(root, held)
    if flags is not None:
        for name, p in root.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])


def _tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for store in (layer._parameters, layer._buffers) for k, v in store.items()
            if k.startswith("lora_") and v is not None}


def _key(module: str, tensor: str) -> str:
    return f"{module}.{tensor}" if module else tensor


def canonical_key(key: str) -> str:
    """Strip wrapper prefixes: torch.compile's `_orig_mod.` anywhere, DDP's `module.` at the front."""
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every adapter tensor (full-path keys) and the config to one safetensors file, atomically.

    Under FSDP2 (`fully_shard`: the tensors are DTensor shards) call it on every rank: it gathers
    the shards, a collective, and rank 0 writes the file.
    """
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("nothing to save: no adapter is attached to this model")
    cfg = layers[0][1].lora_config
    sharded = any(hasattr(v, "full_tensor") for _, layer in layers for v in _tensors(layer).values())
    tensors = {_key(name, k): (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
               for name, layer in layers for k, v in _tensors(layer).items()}
    if sharded and torch.distributed.get_rank() != 0:
        return
    metadata = {"format": "lora-lite", "version": __version__,
                "config": json.dumps(cfg.to_dict()), "targets": json.dumps([n for n, _ in layers])}
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # the old file stays whole until this instant
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read(path: str | os.PathLike) -> tuple[AdapterConfig, list[str], dict[str, torch.Tensor]]:
    """Parse an adapter file: (config, target module names, tensors by canonical key). Executes nothing."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {canonical_key(k): f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error type on anything malformed
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    if "config" not in metadata or "targets" not in metadata:
        raise ValueError(f"{path} has no lora-lite metadata (config, targets): not a lora-lite adapter file")
    try:
        cfg_dict, targets = json.loads(metadata["config"]), json.loads(metadata["targets"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed metadata JSON: {e}") from None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{path}: metadata 'targets' must be a list of module names")
    names = [canonical_key(t + ".")[:-1] for t in targets]  # the dot lets a trailing `._orig_mod` go too
    if not names:
        raise ValueError(f"{path}: metadata 'targets' is empty: no target module to attach to")
    dups = sorted(n for n, count in Counter(names).items() if count > 1)
    if dups:  # attaching twice to one layer would fail half-way with a confusing message
        raise ValueError(f"{path}: metadata 'targets' lists modules more than once: {dups}")
    try:
        cfg = from_dict(cfg_dict)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path}: {e}") from None
    return cfg, names, tensors


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load(model: nn.Module, path: str | os.PathLike) -> Handle:
    """Attach the adapter saved in `path` and load its tensors strictly. Never runs init or group_init.

    On any error (unreadable file, another architecture, missing / unexpected / mis-shaped keys)
    the model is left exactly as it was.
    """
    _check_order(model)
    root = unwrap(model)
    _check_free(root)
    cfg, names, tensors = read(path)
    variant = _variant(cfg)
    by_name = {t.name: t for t in candidates(root)}
    absent = [n for n in names if n not in by_name]
    if absent:
        raise ValueError(f"{path} targets modules this model lacks (an adapter for another architecture?): "
                         f"{_listing(absent)}")
    targets = [by_name[n] for n in names]
    expected = {_key(t.name, k): spec.shape for t in targets for k, spec in _specs(variant, t, cfg).items()}
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(s)}"
             for k, s in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(s)]
    problems = ([f"missing keys: {_listing(missing)}"] if missing else []) + \
               ([f"unexpected keys: {_listing(unexpected)}"] if unexpected else []) + \
               ([f"wrong shapes: {_listing(wrong)}"] if wrong else [])
    if problems:
        raise ValueError(f"{path} does not fit this model: " + "; ".join(problems))
    _attach(root, cfg, targets, init=False)
    try:
        with torch.no_grad():
            for t in targets:
                for k, v in _tensors(t.layer).items():
                    v.copy_(tensors[_key(t.name, k)])
    except BaseException:
        detach(root)
        raise
    return Handle(model, cfg, targets)


def merge(model: nn.Module) -> None:
    """Fold each layer's delta_weight into its float base weight, then remove the adapter.

    Checked before any weight is written: every layer is float (not quantized), its variant has
    delta_weight, and the update is finite in the weight's dtype.
    """
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("nothing to merge: no adapter is attached to this model")
    owners: dict[int, list[str]] = {}
    for pname, p in unwrap(model).named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    with torch.no_grad():
        for name, layer in layers:
            tied = [n for n in owners.get(id(layer.weight), []) if n != _key(name, "weight")]
            if tied:
                raise ValueError(f"the weight of {name} is tied to {tied}: merging would change those too. "
                                 f"Untie it first (e.g. clone the weight) or keep the adapter unmerged")
            if is_quantized(layer):
                raise TypeError(f"cannot merge into quantized layer {name} ({type(layer).__name__}): load the base "
                                f"model in float, then ll.load(model, adapter_file) and ll.merge(model)")
            if not hasattr(layer.lora_variant, "delta_weight"):
                raise TypeError(f"variant {layer.lora_variant.name} has no delta_weight: it cannot be merged")
            delta = layer.lora_variant.delta_weight(layer).to(layer.weight.dtype)
            if not torch.isfinite(delta).all():
                raise ValueError(f"the update of {name} is not finite (NaN or Inf): nothing was merged")
        for _, layer in layers:
            add_to_weight(layer, layer.lora_variant.delta_weight(layer))
    detach(model)


def set_step(model: nn.Module, step: int) -> None:
    """Set the training step of every step-scheduled layer (e.g. SingLoRA's ramp); others ignore it."""
    try:
        step = operator.index(step)  # ints, numpy ints, integer 0-d tensors; not floats or strings
    except TypeError:
        raise TypeError(f"step must be an int, got {step!r}") from None
    if step < 0:  # checked here, before any layer is touched
        raise ValueError(f"step must be >= 0, got {step}")
    for _, layer in adapted_layers(model):
        if hasattr(layer.lora_variant, "on_step"):
            layer.lora_variant.on_step(layer, step)


def track_steps(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Advance every step-scheduled layer by one after each real `optimizer.step()`.

    Returns the hook's handle (`.remove()` stops tracking). Gradient accumulation needs
    nothing more: the step counts optimizer steps, not forwards.
    """
    root = unwrap(model)
    for _, layer in adapted_layers(root):
        layer.lora_steps_tracked = True  # step 0 before the first opt.step() is expected (SingLoRA's warning)

    def advance(opt, args, kwargs):
        for _, layer in adapted_layers(root):
            if hasattr(layer.lora_variant, "on_step"):
                layer.lora_variant.on_step(layer, None)

    return optimizer.register_step_post_hook(advance)


def summary(model: nn.Module) -> str:
    """A table of adapted layers: module, role, d_in->d_out, variant, trainable params; totals and %."""
    root = unwrap(model)
    layers = adapted_layers(root)
    if not layers:
        return "no adapter attached"
    cfg = layers[0][1].lora_config
    roles = {t.name: t.role for t in candidates(root)}
    rows = [("module", "role", "d_in->d_out", "variant", "trainable")]
    total = 0
    for name, layer in layers:
        n = sum(p.numel() for p in layer._parameters.values() if p is not None and p.requires_grad)
        total += n
        d_in, d_out = dims(layer)
        rows.append((name, roles.get(name) or "square?", f"{d_in}->{d_out}", cfg.variant, f"{n:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    base = sum(p.numel() for n, p in root.named_parameters() if ".lora_" not in f".{n}")
    lines.append(f"{len(layers)} layers, {total:,} trainable adapter params = {100 * total / max(base, 1):.4f}% "
                 f"of {base:,} base params")
    for pattern in cfg.target_names:
        hits = [n for n, _ in layers if re.search(pattern, n)]
        lines.append(f"target_names {pattern!r} matched {len(hits)}")
    return "\n".join(lines)

