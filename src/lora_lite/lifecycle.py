"""Attach and detach: freeze the base, add each target's tensors, attributes and hook, and take them all
away again, with one rollback that attach, load and group_init share.

Attach records on every layer what it added (state.py), so detach removes exactly that and nothing a user
put there. The root keeps the base parameters' `requires_grad` flags from before attach; detach restores
them before it forgets them, so an interrupted detach is finished by calling it again.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .anatomy import Target
from .config import AdapterConfig
from . import modules_to_save
from .hook import adapter_hook, input_embeddings, inputs_require_grad, remove_hooks, unwatch, watch
from .state import ADDED, CONFIG, FLAGS, HITS, REPACK, adapted_layers, clashes, record, remove_added, set_attr
from .target import pattern_hits, select
from .variant import REGISTRY, ParamSpec, Variant
from .weights import hold_cpu_repack, is_cpu_repacked, is_linear_like, release_cpu_repack
from .wrappers import check_order, unwrap

ATTRIBUTES = ("lora_state", "lora_config", "lora_variant")  # set on every target layer besides its tensors


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


def variant_for(cfg: AdapterConfig) -> type[Variant]:
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"expected an AdapterConfig (e.g. ll.LoRAConfig(...)), got {type(cfg).__name__}")
    if cfg.variant not in REGISTRY:
        raise ValueError(f"unknown variant {cfg.variant!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[cfg.variant]


def layer_specs(variant: type[Variant], targets: list[Target], cfg: AdapterConfig) -> list[dict[str, ParamSpec]]:
    """Each target's ParamSpecs, all validated before anything is added; errors name the layer."""
    out = []
    for t in targets:
        try:
            specs = variant.param_specs(t.d_in, t.d_out, cfg.for_layer(t.name))
        except ValueError as e:
            raise ValueError(f"{e} (layer {t.name}, {t.d_in}->{t.d_out})") from None
        bad = [k for k in specs if not k.startswith("lora_")]
        if bad:
            raise TypeError(f"variant {variant.name} declares tensors {bad}: names must start with 'lora_'")
        out.append(specs)
    cfg.check_patterns_used([t.name for t in targets])
    _check_size(targets, out, cfg)
    return out


def _check_size(targets: list[Target], specs: list[dict[str, ParamSpec]], cfg: AdapterConfig) -> None:
    """Refuse an adapter larger than the memory of its device before allocating any of it (an over-committed
    allocation would succeed and be killed when zero-filled)."""
    need: dict[torch.device, int] = defaultdict(int)
    for t, layer in zip(targets, specs):
        for spec in layer.values():
            size = (spec.dtype or cfg.dtype).itemsize * math.prod(spec.shape)  # torch's numel wraps past int64
            need[t.layer.weight.device] += size
    for device, size in need.items():
        total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                 else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if device.type == "cpu" else None)
        if total is not None and size > total:
            big = max(zip(targets, specs), key=lambda ts: sum(math.prod(s.shape) for s in ts[1].values()))
            raise MemoryError(f"the adapter needs {size / 2**30:.1f} GiB on {device}, which has {total / 2**30:.1f} "
                              f"GiB (r={cfg.r}; largest: {big[0].name}, {big[0].d_in}->{big[0].d_out}): lower r")


def check_free(root: nn.Module) -> None:
    """Refuse a model that carries an adapter, part of one, or PEFT's adapters, or is in no state to train."""
    if adapted_layers(root) or FLAGS in root.__dict__:
        raise ValueError("an adapter is already attached to this model (or a detach was interrupted): "
                         "call ll.detach(model) first")
    if hasattr(root, "peft_config") or any(type(m).__module__.startswith("peft.") for m in root.modules()):
        raise ValueError("this model carries PEFT adapters (a PeftModel or PEFT tuner layers): call "
                         "model.merge_and_unload() (keep the update) or model.unload() (drop it) first")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("ll.attach / ll.load inside torch.inference_mode(): tensors made here can never "
                           "take part in a backward. Attach outside it (then use inference_mode as you like)")
    meta = [n for n, p in root.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"{len(meta)} parameters are on the meta device (e.g. {meta[0]}): they hold no values, "
                         f"so the adapter could not be initialised from them. Load the real weights first")


def prepare(model: nn.Module) -> nn.Module:
    """The checks attach and load share; returns the unwrapped root."""
    check_order(model)
    root = unwrap(model)
    check_free(root)
    return root


@contextlib.contextmanager
def rollback(root: nn.Module):
    """Whatever fails inside (an error, an interrupt), the model is detached: left as it was before attach."""
    try:
        yield
    except BaseException:
        detach(root)
        raise


def _warn_repacked(root: nn.Module) -> None:
    repacked = sorted(n for n, m in root.named_modules() if is_linear_like(m) and is_cpu_repacked(m))
    if repacked:
        warnings.warn(f"bitsandbytes has repacked {', '.join(repacked[:20])} for its CPU inference kernel (an "
                      f"eval-mode, no-grad forward did it), which has no backward: gradients will not flow through "
                      f"those layers. To train, reload the base and attach before any eval-mode forward.")


def _new_tensor(spec: ParamSpec, cfg: AdapterConfig, t: Target, key: str) -> torch.Tensor:
    try:
        return torch.zeros(spec.shape, dtype=spec.dtype or cfg.dtype, device=t.layer.weight.device)
    except (RuntimeError, MemoryError) as e:  # torch's out-of-memory names neither the layer nor r
        raise MemoryError(f"cannot allocate {key} {tuple(spec.shape)} for {t.name} (r={cfg.r}): {e}") from None


def _install_layer(t: Target, cfg: AdapterConfig, variant: type[Variant], specs: dict[str, ParamSpec]) -> None:
    layer = t.layer
    taken = clashes(layer, [*specs, *ATTRIBUTES, ADDED])
    if taken:
        raise ValueError(f"{t.name} already has {taken}: lora-lite would overwrite them. Rename them or exclude "
                         f"the layer (exclude_names)")
    set_attr(layer, "lora_state", {})  # runtime flags of the variant (e.g. SingLoRA's step check)
    for key, spec in specs.items():
        record(layer, key)  # before registering: a failure half-way still leaves the key to remove
        tensor = _new_tensor(spec, cfg, t, key)
        if spec.as_buffer:
            layer.register_buffer(key, tensor)
        else:
            layer.register_parameter(key, nn.Parameter(tensor, requires_grad=spec.trainable))
    set_attr(layer, "lora_config", cfg.for_layer(t.name))  # the r and alpha of this layer
    set_attr(layer, "lora_variant", variant)
    layer.register_forward_hook(adapter_hook, with_kwargs=True)


def install(root: nn.Module, cfg: AdapterConfig, variant: type[Variant], targets: list[Target],
            specs: list[dict[str, ParamSpec]]) -> None:
    """Freeze the base; add every target's zero-filled tensors, attributes and hook. Call inside `rollback`."""
    _warn_repacked(root)
    root.__dict__[FLAGS] = {n: p.requires_grad for n, p in root.named_parameters()}
    root.__dict__[CONFIG] = cfg
    root.__dict__[REPACK] = hold_cpu_repack(root)
    for p in root.parameters():
        p.requires_grad_(False)
    for t, layer_specs in zip(targets, specs):
        _install_layer(t, cfg, variant, layer_specs)
    embedding = input_embeddings(root)
    if embedding is not None:
        # the modules transformers' gradient_checkpointing_enable switches (a plain list: deepcopy maps it)
        embedding.__dict__["lora_checkpointable"] = [m for m in root.modules() if hasattr(m, "gradient_checkpointing")]
        embedding.register_forward_hook(inputs_require_grad)


def initialise(targets: list[Target], specs: list[dict[str, ParamSpec]], cfg: AdapterConfig,
               variant: type[Variant]) -> None:
    """Fill the tensors from their ParamSpec inits, then the variant's init (layer by layer, in model order)."""
    dead = defaultdict(list)  # why a layer's adapter can never learn -> those layers
    with torch.no_grad():
        for t, layer_specs in zip(targets, specs):
            for key, spec in layer_specs.items():
                if spec.init is not None:
                    spec.init(getattr(t.layer, key))
            variant.init(t.layer, t.layer.lora_config)
            if not all(bool(v.isfinite().all()) for k, v in t.layer.named_parameters() if k in layer_specs):
                raise ValueError(f"{variant.name} init gave non-finite values on {t.name}: nothing was attached")
            if (reason := variant.dead_reason(t.layer)) is not None:
                dead[reason].append(t.name)
    for reason, names in dead.items():
        warnings.warn(f"{variant.name} can never learn on {', '.join(names[:20])} ({len(names)} layers): {reason}")


def attach(model: nn.Module, cfg: AdapterConfig, calibration_data=None) -> Handle:
    """Freeze `model`, add the adapter `cfg` describes to the layers it selects, and return a Handle.

    `calibration_data` (an iterable of batches: dicts of tensors, tuples or tensors) is passed
    to the variant's `group_init`, for data-calibrated initialisation. On any error the model is left
    exactly as it was.
    """
    root = prepare(model)
    variant = variant_for(cfg)
    targets = select(root, cfg)
    modules = modules_to_save.find(root, cfg, targets)
    specs = layer_specs(variant, targets, cfg)
    with rollback(root):
        install(root, cfg, variant, targets, specs)
        modules_to_save.train(root, modules)
        initialise(targets, specs, cfg, variant)
        variant.group_init(root, targets, cfg, calibration_data)
        root.__dict__[HITS] = pattern_hits(targets, cfg)
        watch(root, [(t.name, t.layer) for t in targets])
    return Handle(model, cfg, targets)


@contextlib.contextmanager
def attached(model: nn.Module, cfg: AdapterConfig, calibration_data=None):
    """`with ll.attached(model, cfg) as handle:` — the adapter is removed on exit, also on error."""
    with attach(model, cfg, calibration_data) as handle:
        yield handle


def detach(model: nn.Module) -> None:
    """Remove exactly what attach added and restore requires_grad. No-op when nothing is attached.

    Each step can be repeated, and the flags are dropped only once restored: a detach cut short (an
    interrupt) is finished by the next one.
    """
    root = unwrap(model)
    unwatch(root)
    for module in root.modules():
        remove_hooks(module, inputs_require_grad)
        module.__dict__.pop("lora_checkpointable", None)
    for _, layer in adapted_layers(root):
        remove_hooks(layer, adapter_hook)
        remove_added(layer)
    modules_to_save.restore(root)
    release_cpu_repack(root, root.__dict__.get(REPACK, {}))
    flags = root.__dict__.get(FLAGS)
    if flags is not None:
        for name, p in root.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
    for key in (REPACK, HITS, CONFIG, FLAGS):  # the flags last: until then a second detach can restore them
        root.__dict__.pop(key, None)
