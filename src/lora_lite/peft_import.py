"""`read_peft`: a PEFT adapter folder as the (config, target names, tensors) that `ll.load` attaches, the
config being the lora-lite one PEFT's means (per-module r and alpha as exact paths).
Only JSON and safetensors are opened: never a pickle (`adapter_model.bin`)."""
from __future__ import annotations

import dataclasses
import os
import re

import torch
from torch import nn

from .adapter_file import listing, open_safetensors
from .config import DTYPES, PLAIN, AdapterConfig, check_int, check_number, pattern_key
from .peft_config import check_fields, check_selection, read_config, targets_of
from .peft_format import CONFIG, FIELDS, INTS, KEYS, PREFIX, WEIGHTS
from .variants.delora import DeLoRAConfig
from .variants.gralora import GraLoRAConfig
from .variants.lora import LoRAConfig
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


def _per_module(d: dict, names: list[str]) -> dict[str, dict]:
    """PEFT's rank_pattern / alpha_pattern as the exact paths they give a value (PEFT's key rule); a regex key
    is refused: nothing read from a file is run as a regex."""
    out = {}
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = d.get(field) or {}
        if not isinstance(pattern, dict):
            raise TypeError(f"{field} must be an object, got {pattern!r:.80}")
        regex = [k for k in pattern if not PLAIN.fullmatch(k)]
        if regex:
            raise ValueError(f"{field} keys {regex[:5]} are regexes, which lora-lite never runs from a file: "
                             f"list module names or paths")
        out[field] = {n: pattern[k] for n in names if (k := pattern_key(pattern, n)) is not None}
        unused = [k for k in pattern if not any(pattern_key([k], n) for n in names)]
        if unused:  # PEFT would skip them too; as a regex ("." matches any character) one might not be unused
            raise ValueError(f"{field} keys {unused[:5]} name no target module of this adapter")
    return out


def lite_config(d: dict, dtype: torch.dtype, names: list[str], where: str) -> AdapterConfig:
    """The lora-lite config of a checked PEFT config. Its selection is the exact target list, so that
    `ll.attach(model, cfg)` picks the same modules again."""
    peft_type = d["peft_type"]
    f = FIELDS[peft_type] | {k: d[k] for k in FIELDS[peft_type] if k in d}
    try:
        for k, v in f.items():
            if k in INTS:
                check_int(k, v, INTS[k])
            elif isinstance(FIELDS[peft_type][k], bool):
                if not isinstance(v, bool):
                    raise TypeError(f"{k} must be true or false, got {v!r}")
            else:
                check_number(k, v)
        common = {"r": f["r"], "dtype": dtype, "target_names": tuple(f"^{re.escape(n)}$" for n in names),
                  "target_roles": (), "exclude_names": ()}
        if peft_type == "LORA":
            return LoRAConfig(alpha=f["lora_alpha"], dropout=f["lora_dropout"], use_rslora=f["use_rslora"], **common,
                              **_per_module(d, names))
        if peft_type == "DELORA":
            return DeLoRAConfig(lambda0=f["delora_lambda"], dropout=f["module_dropout"], **common)
        return GraLoRAConfig(alpha=f["alpha"], k=f["gralora_k"], hybrid_r=f["hybrid_r"],
                             dropout=f["gralora_dropout"], **common)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{where}: {e}") from None


def _saved_modules(d: dict, raw: dict, root: nn.Module, where: str) -> tuple[tuple[str, ...], dict, dict]:
    """PEFT's modules_to_save: (the module paths its names give, PEFT's rule `path.endswith(name)`, their
    tensors by full key, the other tensors)."""
    entries = d.get("modules_to_save") or []
    if not isinstance(entries, list) or not all(isinstance(e, str) and PLAIN.fullmatch(e) for e in entries):
        raise ValueError(f"{where}: modules_to_save must be a list of module names, got {entries!r:.120}")
    paths = tuple(n for n, _ in root.named_modules() if n and any(n == e or n.endswith(f".{e}") for e in entries))
    missing = [e for e in entries if not any(p == e or p.endswith(f".{e}") for p in paths)]
    if missing:
        raise ValueError(f"{where}: modules_to_save {missing} name no module of this {type(root).__name__}")
    prefixes = tuple(f"{PREFIX}{p}." for p in paths)
    saved = {k[len(PREFIX):]: v for k, v in raw.items() if k.startswith(prefixes)}
    return paths, saved, {k: v for k, v in raw.items() if not k.startswith(prefixes)}


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
    paths, saved, rest = _saved_modules(d, _read_tensors(folder), root, where)
    tensors = _lora_lite_keys(rest, d["peft_type"], root, os.path.join(folder, WEIGHTS))
    cfg = dataclasses.replace(lite_config(d, _dtype(tensors, folder), names, where), modules_to_save=paths)
    return cfg, names, tensors | saved
