"""`ll.swap(model, path)`: the values of another saved adapter, copied into the attached one in place.

The file must hold an adapter of the same variant and config, for the same target layers, with every
tensor of the same shape and dtype as the live one. The values are copied into the live Parameter and
buffer objects, so an optimizer built before keeps training them (its moments are the old adapter's, as
after any in-place edit) and a compiled model runs the new values without recompiling: dynamo guards on
the tensors' identity and metadata, which a copy keeps. Selection fields (target_names, roles, layers) may
differ: the target list itself is compared.

The file is read and checked by the loader's own functions (a lora-lite file or a PEFT adapter folder,
the same fit check as `ll.load`), and every check runs before the first value is copied: on any mismatch
the model is left exactly as it was.
"""
from __future__ import annotations

import os

from torch import nn

from . import modules_to_save
from .adapter_file import file_config, listing
from .anatomy import Target
from .config import AdapterConfig
from .loader import fill, fitting
from .state import adapted_layers, full_key, lora_tensors
from .wrappers import unwrap

# what chose the targets (the target list is compared instead), and the dtype (compared tensor by tensor)
NOT_COMPARED = ("target_roles", "target_names", "exclude_names", "layers", "dtype")


def _check_config(file: AdapterConfig, live: AdapterConfig, where: str) -> None:
    if file.variant != live.variant:
        raise ValueError(f"ll.swap: {where} holds a {file.variant} adapter, the model carries {live.variant}: "
                         f"swap takes an adapter of the same variant (ll.detach, then ll.load, to change it)")
    a, b = file.to_dict(), live.to_dict()
    differ = [f"{k}: file {a.get(k)!r} vs attached {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
              if k not in NOT_COMPARED and a.get(k) != b.get(k)]
    if differ:
        raise ValueError(f"ll.swap: {where} was saved with another config ({'; '.join(differ)}): swap takes "
                         f"an adapter of the same config (ll.detach, then ll.load, to change it)")


def _check_targets(targets: list[Target], adapted: list[str], where: str) -> None:
    file, live = {t.name for t in targets}, set(adapted)
    problems = [f"{what}: {listing(names)}" for what, names in (
        ("in the file, not adapted here", file - live), ("adapted here, not in the file", live - file)) if names]
    if problems:
        raise ValueError(f"ll.swap: {where} targets other layers than the attached adapter ({'; '.join(problems)})")


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_dtypes(targets: list[Target], tensors: dict, where: str) -> None:
    pairs = [(full_key(t.name, k), v.dtype) for t in targets for k, v in lora_tensors(t.layer).items()]
    wrong = [f"{key}: file {_name(tensors[key].dtype)} vs model {_name(dtype)}"
             for key, dtype in pairs if tensors[key].dtype != dtype]
    if wrong:
        raise ValueError(f"ll.swap: {where} holds tensors of another dtype than the attached adapter: "
                         f"{listing(wrong)}. Cast the file, or the model's adapter (model.to), to match")


def swap(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the adapter saved in `path` (a lora-lite file or a PEFT adapter folder) into the attached adapter
    in place: same Parameter objects, so optimizers and compiled graphs stay valid. Any mismatch (variant,
    config, targets, shapes, dtypes, invalid values, an unreadable file) is an error and changes nothing."""
    root = unwrap(model)
    layers = adapted_layers(root)
    if not layers:
        raise ValueError("ll.swap: no adapter is attached to this model: use ll.load(model, path) to attach one")
    where = os.fspath(path)
    fit = fitting(root, path)
    _check_config(fit.cfg, file_config(root), where)
    _check_targets(fit.targets, [n for n, _ in layers], where)
    _check_dtypes(fit.targets, fit.tensors, where)
    fill(fit.targets, fit.tensors)
    modules_to_save.fill(fit.modules, fit.saved)
