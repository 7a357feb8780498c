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
import os
import re
import tempfile
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .config import AdapterConfig, from_dict
from .target import Target, candidates, select, unwrap
from .variant import REGISTRY, ParamSpec
from .weights import add_to_weight, dims, is_quantized

FLAGS = "lora_requires_grad"  # root attribute: {param name: requires_grad before attach}
SCRATCH = ("lora_config", "lora_variant")


def _hook(layer: nn.Module, args: tuple, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    x = args[0] if args else kwargs["input"]
    dtype = layer.lora_config.dtype
    return layer.lora_variant.forward(layer, x.to(dtype), y.to(dtype)).to(y.dtype)


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


def _attach(root: nn.Module, cfg: AdapterConfig, targets: list[Target], init: bool) -> None:
    """Add tensors and hooks to `targets` (all specs validated first). On error the model is restored."""
    variant = _variant(cfg)
    specs = [_specs(variant, t, cfg) for t in targets]
    root.__dict__[FLAGS] = {n: p.requires_grad for n, p in root.named_parameters()}
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
    except BaseException:
        detach(root)
        raise


def attach(model: nn.Module, cfg: AdapterConfig, calibration_data=None) -> Handle:
    """Freeze `model`, add the adapter `cfg` describes to the layers it selects, and return a Handle.

    `calibration_data` (an iterable of batches: dicts of tensors, tuples or tensors) is passed
    to the variant's `group_init`, for data-calibrated initialisation.
    """
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
    for _, layer in adapted_layers(root):
        for key in [k for k, fn in layer._forward_hooks.items() if fn is _hook]:
            for hooks in (layer._forward_hooks, layer._forward_hooks_with_kwargs, layer._forward_hooks_always_called):
                hooks.pop(key, None)
        for store in (layer._parameters, layer._buffers):
            for key in [k for k in store if k.startswith("lora_")]:
                del store[key]
        layer._non_persistent_buffers_set.difference_update(
            [k for k in layer._non_persistent_buffers_set if k.startswith("lora_")])
        for key in [k for k in layer.__dict__ if k.startswith("lora_")]:
            del layer.__dict__[key]
    flags = root.__dict__.pop(FLAGS, None)
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
    """Write every adapter tensor (full-path keys) and the config to one safetensors file, atomically."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("nothing to save: no adapter is attached to this model")
    cfg = layers[0][1].lora_config
    tensors = {_key(name, k): v.detach().cpu().contiguous()
               for name, layer in layers for k, v in _tensors(layer).items()}
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
    return from_dict(cfg_dict), [canonical_key(t + ".")[:-1] for t in targets], tensors


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load(model: nn.Module, path: str | os.PathLike) -> Handle:
    """Attach the adapter saved in `path` and load its tensors strictly. Never runs init or group_init.

    On any error (unreadable file, another architecture, missing / unexpected / mis-shaped keys)
    the model is left exactly as it was.
    """
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
    with torch.no_grad():
        for name, layer in layers:
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
    for _, layer in adapted_layers(model):
        if hasattr(layer.lora_variant, "on_step"):
            layer.lora_variant.on_step(layer, int(step))


def track_steps(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Advance every step-scheduled layer by one after each real `optimizer.step()`.

    Returns the hook's handle (`.remove()` stops tracking). Gradient accumulation needs
    nothing more: the step counts optimizer steps, not forwards.
    """
    root = unwrap(model)

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

