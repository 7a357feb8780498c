"""`ll.export_peft`: any lora-lite adapter as a PEFT adapter folder (the forms: peft_format's docstring)."""
from __future__ import annotations

import json
from collections import Counter
import math
import os
import re

import torch
from torch import nn

from .adapter_file import replace_atomically, write_atomic
from .config import AdapterConfig
from .peft_format import CONFIG, FORMS, KEYS, WEIGHTS, peft_key
from .state import adapted_layers, lora_tensors, model_config, saved_modules
from .variant import ScaledConfig
from .variants.delora import DeLoRAConfig
from .variants.gralora import GraLoRAConfig
from .weights import is_conv1d
from .wrappers import unwrap


def _snapshot(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x  # as PEFT writes them: 16, not 16.0


def _lora_alpha(layer: nn.Module, r: int, s: float, fold: bool, rslora: bool) -> float:
    cfg = layer.lora_config
    if fold:
        return r
    if isinstance(cfg, ScaledConfig):  # PEFT's own rule when it converts PiSSA to rank 2r (keeps alpha for LoRA)
        return cfg.alpha * (math.sqrt(r / cfg.r) if rslora else r / cfg.r)
    return s * r


def _as_lora(layers, cfg: AdapterConfig, fold: bool) -> tuple[dict, dict]:
    """Every layer as the LoRA pair its variant's `lora_factors` gives; `fold`: scale into B, lora_alpha = r.
    Layers whose r or alpha differ from the most common pair go into rank_pattern / alpha_pattern by exact path."""
    tensors, pairs = {}, {}
    rslora = isinstance(cfg, ScaledConfig) and cfg.use_rslora and not fold
    for name, layer in layers:
        A, B, s = layer.lora_variant.lora_factors(layer)
        pairs[name] = (A.shape[0], _number(_lora_alpha(layer, A.shape[0], float(s), fold, rslora)))
        tensors[peft_key(name, "lora_A.weight")] = _snapshot(A)
        tensors[peft_key(name, "lora_B.weight")] = _snapshot(B * s if fold else B)
    r, alpha = Counter(pairs.values()).most_common(1)[0][0]
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": cfg.dropout,
              "init_lora_weights": True,
              "rank_pattern": {n: p[0] for n, p in pairs.items() if p[0] != r},
              "alpha_pattern": {n: p[1] for n, p in pairs.items() if p[1] != alpha}}
    return config, tensors


def _renamed(layers, peft_type: str) -> dict[str, torch.Tensor]:
    """The layers' own tensors under PEFT's names for `peft_type` (a native type: same tensors, other names)."""
    peft_name = {ours: suffix for suffix, ours in KEYS[peft_type].items()}
    return {peft_key(name, peft_name[k]): _snapshot(v) for name, layer in layers for k, v in lora_tensors(layer).items()}


def _native(layers, cfg: AdapterConfig) -> tuple[dict, dict]:
    if any(layer.lora_config != cfg for _, layer in layers):  # per-module r / alpha: PEFT's LoRA carries them
        return _as_lora(layers, cfg, fold=False)
    conv1d = any(is_conv1d(layer) for _, layer in layers)
    if isinstance(cfg, DeLoRAConfig) and not conv1d:  # PEFT 0.21's DeLoRA refuses Conv1D: LoRA form then
        config = {"peft_type": "DELORA", "r": cfg.r, "delora_lambda": _number(cfg.lambda0), "module_dropout": cfg.dropout,
                  "init_weights": True}
        return config, _renamed(layers, "DELORA")
    if isinstance(cfg, GraLoRAConfig):
        config = {"peft_type": "GRALORA", "r": cfg.r, "alpha": _number(cfg.alpha), "gralora_k": cfg.k,
                  "hybrid_r": cfg.hybrid_r, "gralora_dropout": cfg.dropout, "init_weights": True}
        return config, _renamed(layers, "GRALORA")
    return _as_lora(layers, cfg, fold=False)


def _target_modules(root: nn.Module, names: list[str]) -> list[str] | str:
    """The exact paths; as one anchored regex instead when a path is also the tail of another module's
    (PEFT's list entries match as suffixes), which only nested copies of a model can produce."""
    chosen = set(names)
    others = [n for n, _ in root.named_modules() if n not in chosen]
    if any(o.endswith("." + n) for o in others for n in names):
        return "|".join(re.escape(n) for n in names)  # PEFT: re.fullmatch
    return names


def _base_name(root: nn.Module) -> str | None:
    name = getattr(root, "name_or_path", None) or getattr(getattr(root, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def export_peft(model: nn.Module, folder: str | os.PathLike, form: str = "native") -> None:
    """Write the attached adapter as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

    `form="native"`: PEFT's own type where it has one, else LoRA; `form="lora"`: a plain LoRA, scale folded
    into lora_B and lora_alpha = r, for vLLM and any runtime that reads PEFT's LoRA format. See the module doc.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    root = unwrap(model)
    layers = adapted_layers(root)
    if not layers:
        raise ValueError("nothing to export: no adapter is attached to this model")
    cfg = model_config(root)
    with torch.no_grad():
        config, tensors = _native(layers, cfg) if form == "native" else _as_lora(layers, cfg, fold=True)
        modules = saved_modules(root)  # PEFT's modules_to_save: by exact path, values under the module's keys
        tensors |= {peft_key(p, k): _snapshot(v) for p, m in modules.items() for k, v in m.state_dict().items()}
    if modules:
        config["modules_to_save"] = list(modules)
    config |= {"target_modules": _target_modules(root, [n for n, _ in layers]), "bias": "none",
               "fan_in_fan_out": any(is_conv1d(layer) for _, layer in layers), "inference_mode": True,
               "base_model_name_or_path": _base_name(root)}
    if config["peft_type"] == "DELORA":
        del config["fan_in_fan_out"]  # DeLoRA's config has no such field
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    write_atomic(tensors, {"format": "pt"}, os.path.join(folder, WEIGHTS))
    replace_atomically(os.path.join(folder, CONFIG), lambda tmp: _write_json(tmp, config))


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
