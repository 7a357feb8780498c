"""Putting a saved adapter onto a model: `load` (attach from a file, strictly) and the checks it runs.

A file fits a model when its targets are linear-like modules of the model and its keys are exactly the
tensors the variant declares for them, each of the declared shape and kind (floating, or the declared
integer type), finite, and within the variant's invariants (`check_tensors`). Everything is checked before
the model is touched. Load never runs init or group_init: everything they computed is a saved tensor.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from . import modules_to_save
from .adapter_file import listing, read
from .config import PLAIN, AdapterConfig
from .hook import watch
from .lifecycle import Handle, install, layer_specs, prepare, rollback, variant_for
from .peft_format import is_peft_adapter
from .peft_import import read_peft
from .state import full_key, lora_tensors
from .anatomy import Target, candidates
from .variant import ParamSpec, Variant

WRAPPER_TOKENS = ("_orig_mod.", "module.")  # what torch.compile and DDP put into state_dict keys


def canonical(key: str, known) -> str:
    """`key` itself when the model has it; else the key with wrapper prefixes taken out, as a state_dict of a
    compiled or DDP-wrapped model writes them. A model's own child named `module` is thus never rewritten."""
    if key in known:
        return key
    parts = key.split(".")
    return ".".join(p for p in parts if f"{p}." not in WRAPPER_TOKENS)


def by_canonical(keys, known, path: str, what: str) -> dict[str, str]:
    """{canonical key: the file's key}; two file keys that mean the same thing are an error naming both."""
    mapped = defaultdict(list)
    for k in keys:
        mapped[canonical(k, known)].append(k)
    same = [" and ".join(v) for v in mapped.values() if len(v) > 1]
    if same:
        raise ValueError(f"{path}: {what} more than once: {listing(same)}")
    return {k: v[0] for k, v in mapped.items()}


def targets_named(root: nn.Module, names: list[str], path: str) -> list[Target]:
    by_name = {t.name: t for t in candidates(root)}
    mapped = by_canonical(names, by_name, path, "targets name the same module")
    absent = [n for n in mapped if n not in by_name]
    if absent:
        raise ValueError(f"{path} targets modules this model lacks (an adapter for another architecture?): "
                         f"{listing(absent)}")
    return [by_name[n] for n in mapped]


def _bad_value(t: torch.Tensor, spec: ParamSpec, dtype: torch.dtype) -> str | None:
    want = spec.dtype or dtype
    if want.is_floating_point != t.is_floating_point() or (not want.is_floating_point and t.dtype != want):
        return f"dtype {str(t.dtype).removeprefix('torch.')}, expected {'floating' if want.is_floating_point else want}"
    if want.is_floating_point and not bool(t.to(want).isfinite().all()):  # 1e300 in float64 is inf in float32
        return f"non-finite values (NaN or Inf{' after the cast to ' + str(want) if t.dtype != want else ''})"
    return None


def check_fit(targets: list[Target], specs: list[dict[str, ParamSpec]], tensors: dict[str, torch.Tensor],
              cfg: AdapterConfig, variant: type[Variant], path: str) -> None:
    """Raise one ValueError listing every missing, unexpected, mis-shaped, mis-typed or invalid tensor."""
    expected = {full_key(t.name, k): s for t, layer in zip(targets, specs) for k, s in layer.items()}
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(s.shape)}"
             for k, s in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(s.shape)]
    bad = [f"{k}: {why}" for k, s in expected.items()
           if k in tensors and not wrong and (why := _bad_value(tensors[k], s, cfg.dtype))]
    if not (missing or unexpected or wrong or bad):
        for t, layer in zip(targets, specs):
            own = {k: tensors[full_key(t.name, k)] for k in layer}
            bad += [f"{full_key(t.name, k)}: breaks {variant.name}'s invariant" for k in variant.check_tensors(own, cfg)]
    problems = [f"{what}: {listing(keys)}" for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                              ("wrong shapes", wrong), ("invalid values", bad)) if keys]
    if problems:
        raise ValueError(f"{path} does not fit this model: " + "; ".join(problems))


def check_exact(cfg: AdapterConfig, path: str) -> None:
    """A file names modules by their exact paths (`file_config`): a pattern in it would be run as a regex."""
    for name in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        regex = [k for k in getattr(cfg, name) if not PLAIN.fullmatch(k)]
        if regex:
            raise ValueError(f"{path}: {name} holds patterns {listing(regex, 5)}, not module paths: a file's "
                             f"names are matched, never run as regexes (ll.save writes the paths)")


def fill(targets: list[Target], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for t in targets:
            for k, v in lora_tensors(t.layer).items():
                v.copy_(tensors[full_key(t.name, k)])


@dataclass
class Fit:
    """A file's adapter, checked against a model: what load installs and swap copies."""

    cfg: AdapterConfig
    variant: type[Variant]
    targets: list[Target]
    specs: list[dict[str, ParamSpec]]
    tensors: dict[str, torch.Tensor]  # adapter tensors by canonical key
    modules: dict[str, nn.Module]  # modules_to_save by path
    saved: dict[str, torch.Tensor]  # their values by full key


def fitting(root: nn.Module, path: str | os.PathLike) -> Fit:
    """Read `path` (a lora-lite file or a PEFT folder) and check every value of it against `root`; touches nothing."""
    cfg, names, tensors = read_peft(path, root) if is_peft_adapter(path) else read(path)
    where = os.fspath(path)
    variant = variant_for(cfg)
    targets = targets_named(root, names, where)
    check_exact(cfg, where)
    modules = modules_to_save.find(root, cfg, targets)
    tensors, saved = modules_to_save.split(modules, tensors, where)
    try:
        specs = layer_specs(variant, targets, cfg)
    except (ValueError, MemoryError) as e:  # the file's r or shapes: name the file
        raise type(e)(f"{where}: {e}") from None
    expected = {full_key(t.name, k) for t, layer in zip(targets, specs) for k in layer}
    tensors = {k: tensors[v] for k, v in by_canonical(tensors, expected, where, "keys name the same tensor").items()}
    check_fit(targets, specs, tensors, cfg, variant, where)
    return Fit(cfg, variant, targets, specs, tensors, modules, saved)


def load(model: nn.Module, path: str | os.PathLike) -> Handle:
    """Attach the adapter saved in `path` (a lora-lite file, or a PEFT adapter folder: peft_format) and load its
    tensors strictly. Never runs init or group_init.

    On any error (unreadable file, another architecture, missing / unexpected / mis-shaped / invalid
    tensors) the model is left exactly as it was.
    """
    root = prepare(model)
    fit = fitting(root, path)
    with rollback(root):
        install(root, fit.cfg, fit.variant, fit.targets, fit.specs)
        fill(fit.targets, fit.tensors)
        modules_to_save.train(root, fit.modules)
        modules_to_save.fill(fit.modules, fit.saved)
        watch(root, [(t.name, t.layer) for t in fit.targets])
    return Handle(model, fit.cfg, fit.targets)
