"""PEFT adapter folders: write any lora-lite adapter as one, read PEFT's LoRA, DeLoRA and GraLoRA ones.

A folder holds `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.<tensor>` (what PEFT 0.21's `save_pretrained` writes).

Export, `export_peft(model, folder, form)`:
- `form="native"`: PEFT's own type where PEFT has one that loads on these layers: LoRA and rsLoRA as
  LORA, DeLoRA as DELORA (PEFT's takes nn.Linear only), GraLoRA as GRALORA. Every other variant is the
  LoRA its `lora_factors` gives, scale kept in `lora_alpha`: PiSSA as the rank-2r LoRA
  s [B, -B0] [A; A0] that PEFT itself converts PiSSA to for the unmodified base, SingLoRA as a rank-r
  LoRA with its current ramp folded in (the schedule does not travel).
- `form="lora"`: every variant as a plain LoRA, the scale folded into `lora_B`, `lora_alpha = r`: what
  any runtime that reads PEFT's LoRA format serves (vLLM, TGI).
`target_modules` is the list of exact module paths, so no runtime can match more or fewer modules.

Import, `read_peft(path, model)`: PEFT's LORA, DELORA and GRALORA adapters become the lora-lite config,
target names and tensors that `ll.load` attaches; outputs equal `PeftModel.from_pretrained`. Whatever
lora-lite cannot compute exactly (DoRA, per-module ranks, a trained bias, other PEFT types ...) is refused
with an error naming the field; keys that do not all land on modules of the model are refused by name.
Only JSON and safetensors are opened: never a pickle (`adapter_model.bin`).
"""
from __future__ import annotations

import json
import math
import os
import re

import torch
from torch import nn

from .adapter_file import listing, open_safetensors, replace_atomically, write_atomic
from .config import DTYPES, AdapterConfig, check_int, check_number
from .state import adapted_layers, lora_tensors, saved_modules
from .anatomy import candidates
from .variant import ScaledConfig
from .variants.delora import DeLoRAConfig
from .variants.gralora import GraLoRAConfig
from .variants.lora import LoRAConfig
from .weights import is_conv1d
from .wrappers import unwrap

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
FORMS = ("native", "lora")

# per PEFT type: the suffix of a PEFT key (after the module path) -> the lora-lite tensor name
KEYS = {
    "LORA": {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"},
    "DELORA": {"delora_A": "lora_A", "delora_B": "lora_B", "delora_lambda": "lora_lambda",
               "delora_w_norm": "lora_wnorm"},
    "GRALORA": {"gralora_A": "lora_A", "gralora_B": "lora_B", "gralora_A_general.weight": "lora_A_general",
                "gralora_B_general.weight": "lora_B_general"},
}
SELECTION = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "bias", "fan_in_fan_out")
# per PEFT type: the fields the import reads, with PEFT 0.21's defaults for those a config may leave out
FIELDS = {
    "LORA": {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False},
    "DELORA": {"r": 8, "delora_lambda": 15, "module_dropout": 0.0},
    "GRALORA": {"r": 32, "alpha": 64, "gralora_k": 2, "hybrid_r": 0, "gralora_dropout": 0.0},
}
INTS = {"r": 1, "gralora_k": 1, "hybrid_r": 0}  # integer fields and their minimum
# fields that do not change what a loaded adapter computes: bookkeeping, runtime options, settings used only
# by an initialisation that is itself refused (loftq_config ...), or only by the init the file overwrites
IGNORED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
           "inference_mode", "runtime_config", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
           "corda_config", "lora_ga_config", "ensure_weight_tying", "lambda_pattern"}
HINTS = {"use_dora": "lora-lite has no DoRA", "rank_pattern": "per-module ranks are not supported yet",
         "alpha_pattern": "per-module alphas are not supported yet",
         "modules_to_save": "fully trained extra modules are not supported yet"}


def _peft_key(module: str, suffix: str) -> str:
    return f"{PREFIX}{module}.{suffix}"


# ---- export ---------------------------------------------------------------------------------------------

def _snapshot(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _uniform(values: list, what: str):
    if len(set(values)) > 1:
        raise ValueError(f"the adapted layers have different {what} ({sorted(set(values))}): a PEFT config "
                         f"holds one; export the layers that share it separately")
    return values[0]


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x  # as PEFT writes them: 16, not 16.0


def _as_lora(layers, cfg: AdapterConfig, fold: bool) -> tuple[dict, dict]:
    """Every layer as the LoRA pair its variant's `lora_factors` gives; `fold`: scale into B, lora_alpha = r."""
    tensors, ranks, scales = {}, [], []
    for name, layer in layers:
        A, B, s = layer.lora_variant.lora_factors(layer)
        ranks.append(A.shape[0])
        scales.append(float(s))
        tensors[_peft_key(name, "lora_A.weight")] = _snapshot(A)
        tensors[_peft_key(name, "lora_B.weight")] = _snapshot(B * s if fold else B)
    r, s = _uniform(ranks, "ranks"), _uniform(scales, "scales")
    rslora = isinstance(cfg, ScaledConfig) and cfg.use_rslora and not fold
    if fold:
        alpha = r
    elif isinstance(cfg, ScaledConfig):  # PEFT's own rule when it converts PiSSA to rank 2r (keeps alpha for LoRA)
        alpha = cfg.alpha * (math.sqrt(r / cfg.r) if rslora else r / cfg.r)
    else:
        alpha = s * r
    config = {"peft_type": "LORA", "r": r, "lora_alpha": _number(alpha), "use_rslora": rslora, "lora_dropout": cfg.dropout,
              "init_lora_weights": True}
    return config, tensors


def _renamed(layers, peft_type: str) -> dict[str, torch.Tensor]:
    """The layers' own tensors under PEFT's names for `peft_type` (a native type: same tensors, other names)."""
    peft_name = {ours: suffix for suffix, ours in KEYS[peft_type].items()}
    return {_peft_key(name, peft_name[k]): _snapshot(v) for name, layer in layers for k, v in lora_tensors(layer).items()}


def _native(layers, cfg: AdapterConfig) -> tuple[dict, dict]:
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
    cfg = layers[0][1].lora_config
    if saved_modules(root) or any(layer.lora_config != cfg for _, layer in layers):
        raise ValueError("export_peft does not yet write modules_to_save or per-module ranks / alphas "
                         "(rank_pattern, alpha_pattern): save with ll.save, which keeps them")
    with torch.no_grad():
        config, tensors = _native(layers, cfg) if form == "native" else _as_lora(layers, cfg, fold=True)
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


# ---- import ---------------------------------------------------------------------------------------------

def is_peft_adapter(path: str | os.PathLike) -> bool:
    """A folder, or the adapter_model.safetensors / adapter_config.json in one, with the config beside it."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        return False  # read() refuses it, naming the type
    path = os.fspath(path)
    if os.path.isdir(path):
        return True
    return os.path.basename(path) in (WEIGHTS, CONFIG) and os.path.isfile(os.path.join(os.path.dirname(path), CONFIG))


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is a folder without {CONFIG}, so not a PEFT adapter folder: ll.load "
                         f"takes a lora-lite .safetensors file or a PEFT adapter folder")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (ValueError, RecursionError) as e:  # malformed, not UTF-8, nested too deep, an int too long
        raise ValueError(f"{path} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


def _empty(value) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _check_fields(d: dict, where: str) -> None:
    """Refuse, naming the fields, every PEFT setting that would make the import compute something else."""
    peft_type = d.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in FIELDS:
        raise ValueError(f"{where}: peft_type {peft_type!r:.80} cannot be imported; lora-lite reads {sorted(FIELDS)}")
    problems = []
    if d.get("bias", "none") != "none":
        problems.append(f"bias={d['bias']!r:.80} (PEFT trains the base layers' biases; only 'none' imports)")
    init_field = "init_lora_weights" if peft_type == "LORA" else "init_weights"
    init = d.get(init_field, True)
    # True, False and "gaussian" only fill the adapter's tensors, which the file overwrites; the others
    # (pissa, olora, corda, loftq ...) make PEFT rewrite the base weight when it loads the adapter
    if not (isinstance(init, bool) or init == "gaussian"):
        problems.append(f"{init_field}={init!r:.80} (PEFT rewrites the base weight when it loads such an adapter; "
                        f"convert it to a LoRA first, e.g. PiSSA with save_pretrained(..., "
                        f"path_initial_model_for_weight_conversion=...))")
    known = FIELDS[peft_type].keys() | set(SELECTION) | IGNORED | {init_field}
    for field, value in d.items():
        if field not in known and not _empty(value):
            problems.append(f"{field:.80}={value!r:.80} ({HINTS.get(field, 'lora-lite cannot compute it exactly')})")
    if problems:
        raise ValueError(f"{where}: this {peft_type} adapter uses PEFT features lora-lite cannot reproduce "
                         f"exactly, so it is not loaded: " + "; ".join(problems))


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_selection(d: dict, where: str) -> None:
    """The selection fields hold what PEFT accepts there; their regexes compile."""
    for field in ("target_modules", "exclude_modules", "layers_pattern"):
        value = d.get(field)
        if field == "target_modules" and value is None:
            raise ValueError(f"{where}: target_modules is missing: name the adapted modules (PEFT fills it in "
                             f"when it saves an adapter)")
        if value is not None and not (isinstance(value, str) or _strings(value)):
            raise TypeError(f"{where}: {field} must be a string or a list of strings, got {value!r:.80}")
        # a string is a regex (as is every layers_pattern entry); list entries of the others are plain names
        for pattern in [value] if isinstance(value, str) else value if field == "layers_pattern" and value else []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{where}: {field} {pattern!r:.80} is not a valid regex: {e}") from None
    layers = d.get("layers_to_transform")
    is_index = lambda i: isinstance(i, int) and not isinstance(i, bool)  # noqa: E731
    if layers is not None and not (is_index(layers) or (isinstance(layers, list) and all(map(is_index, layers)))):
        raise TypeError(f"{where}: layers_to_transform must be an int or a list of ints, got {layers!r:.80}")
    if isinstance(d["target_modules"], str) and layers is not None:
        raise ValueError(f"{where}: layers_to_transform cannot be used with a regex target_modules (PEFT refuses it)")


def _named(spec: str | list[str], name: str) -> bool:
    """PEFT's matching: a string is a regex on the full path; a list entry the path itself or its tail."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + k) for k in spec)


def _in_layers(d: dict, name: str) -> bool:
    """PEFT's layers_to_transform: the first `<layers_pattern>.<index>.` in the path (any pattern if unset)."""
    wanted = d.get("layers_to_transform")
    if wanted is None or wanted == []:
        return True
    patterns = d.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    match = next((m for rx in regexes if (m := re.match(rx, name))), None)
    if match is None:
        return False
    return int(match["idx"]) == wanted if isinstance(wanted, int) else int(match["idx"]) in wanted


def _all_linear(root: nn.Module) -> list[str]:
    """PEFT's "all-linear": every linear-like module but the output embedding."""
    get = getattr(root, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return [t.name for t in candidates(root) if t.layer is not head]


def _targets(d: dict, root: nn.Module, where: str) -> list[str]:
    """The linear-like modules PEFT would adapt, in model order."""
    spec, exclude = d["target_modules"], d.get("exclude_modules")
    if isinstance(spec, str) and spec.lower() == "all-linear":
        spec = _all_linear(root)
    names = []
    for t in candidates(root):
        if exclude and _named(exclude, t.name):
            continue
        # as in PEFT, an exact name in the list is taken whatever layers_to_transform says
        if (isinstance(spec, list) and t.name in spec) or (_named(spec, t.name) and _in_layers(d, t.name)):
            names.append(t.name)
    if not names:
        raise ValueError(f"{where}: target_modules={d['target_modules']!r} (exclude_modules={exclude!r}, "
                         f"layers_to_transform={d.get('layers_to_transform')!r}) matches no linear-like module "
                         f"of this {type(root).__name__}: an adapter for another architecture?")
    return names


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


def _config(d: dict, dtype: torch.dtype, names: list[str], where: str) -> AdapterConfig:
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
            return LoRAConfig(alpha=f["lora_alpha"], dropout=f["lora_dropout"], use_rslora=f["use_rslora"], **common)
        if peft_type == "DELORA":
            return DeLoRAConfig(lambda0=f["delora_lambda"], dropout=f["module_dropout"], **common)
        return GraLoRAConfig(alpha=f["alpha"], k=f["gralora_k"], hybrid_r=f["hybrid_r"],
                             dropout=f["gralora_dropout"], **common)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{where}: {e}") from None


def read_peft(path: str | os.PathLike, model: nn.Module) -> tuple[AdapterConfig, list[str], dict[str, torch.Tensor]]:
    """Parse a PEFT adapter folder for `model`: (config, target module names, tensors by lora-lite key),
    what `read` returns for a lora-lite file. Executes nothing; opens no pickle."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    d = _read_config(folder)
    where = os.path.join(folder, CONFIG)
    _check_fields(d, where)
    _check_selection(d, where)
    root = unwrap(model)
    names = _targets(d, root, where)
    tensors = _lora_lite_keys(_read_tensors(folder), d["peft_type"], root, os.path.join(folder, WEIGHTS))
    return _config(d, _dtype(tensors, folder), names, where), names, tensors
