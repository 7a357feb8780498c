"""`read_peft`: a PEFT adapter folder as the (config, target names, tensors) that `ll.load` attaches.
Only JSON and safetensors are opened: never a pickle (`adapter_model.bin`)."""
from __future__ import annotations

import os

import torch
from torch import nn

from .adapter_file import listing, open_safetensors
from .config import DTYPES, AdapterConfig
from .peft_config import check_fields, check_selection, lite_config, read_config, targets_of
from .peft_format import CONFIG, KEYS, PREFIX, WEIGHTS
from .wrappers import unwrap


def _read_tensors(folder: str) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(path):
        pickle = os.path.exists(os.path.join(folder, "adapter_model.bin"))
        raise FileNotFoundError(f"{folder} has no {WEIGHTS}" + (
            " (only adapter_model.bin, a pickle, which lora-lite never opens: re-save the adapter with PEFT's "
            "save_pretrained, which writes safetensors)" if pickle else ""))
    return open_safetensors(path)[1]


def _lora_lite_keys(raw: dict, peft_type: str, root: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """PEFT keys -> `<module>.lora_*`; every key must be one of `peft_type`'s and land on a module of `root`."""
    suffixes, modules = KEYS[peft_type], {n for n, _ in root.named_modules()}
    out, unknown, nowhere = {}, [], []
    for key, tensor in raw.items():
        rest = key[len(PREFIX):] if key.startswith(PREFIX) else ""
        suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
        elif rest[:-len(suffix) - 1] not in modules:
            nowhere.append(key)
        else:
            out[f"{rest[:-len(suffix) - 1]}.{suffixes[suffix]}"] = tensor
    problems = ([f"keys that are not {peft_type} adapter tensors (`{PREFIX}<module>.` + one of "
                 f"{sorted(suffixes)}): {listing(unknown)}"] if unknown else []) + \
               ([f"keys for modules this {type(root).__name__} lacks: {listing(nowhere)}"] if nowhere else [])
    if problems:
        raise ValueError(f"{where} does not fit this model: " + "; ".join(problems))
    if not out:
        raise ValueError(f"{where} holds no adapter tensors")
    return out


def _dtype(tensors: dict[str, torch.Tensor], where: str) -> torch.dtype:
    """The dtype the adapter was trained in: that of its A factors."""
    dtypes = {t.dtype for k, t in tensors.items() if k.endswith(".lora_A")}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES.values():
        raise ValueError(f"{where}: the lora_A tensors must share one float dtype of {sorted(DTYPES)}, "
                         f"got {sorted(map(str, dtypes))}")
    return next(iter(dtypes))


def read_peft(path: str | os.PathLike, model: nn.Module) -> tuple[AdapterConfig, list[str], dict[str, torch.Tensor]]:
    """Parse a PEFT adapter folder for `model`: (config, target module names, tensors by lora-lite key),
    what `read` returns for a lora-lite file. Executes nothing; opens no pickle."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    d = read_config(folder)
    where = os.path.join(folder, CONFIG)
    check_fields(d, where)
    check_selection(d, where)
    root = unwrap(model)
    names = targets_of(d, root, where)
    tensors = _lora_lite_keys(_read_tensors(folder), d["peft_type"], root, os.path.join(folder, WEIGHTS))
    return lite_config(d, _dtype(tensors, folder), names, where), names, tensors
