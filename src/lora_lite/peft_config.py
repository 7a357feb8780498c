"""A PEFT adapter_config.json read for lora-lite: every field checked, the target modules PEFT would adapt,
checked. Executes nothing."""
from __future__ import annotations

import json
import os
import re

from torch import nn

from .anatomy import candidates
from .peft_format import CONFIG, FIELDS, HINTS, IGNORED, SELECTION


def read_config(folder: str) -> dict:
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


def check_fields(d: dict, where: str) -> None:
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
    patterns = {"rank_pattern", "alpha_pattern"} if peft_type == "LORA" else set()
    known = FIELDS[peft_type].keys() | set(SELECTION) | IGNORED | {init_field, "modules_to_save"} | patterns
    for field, value in d.items():
        if field not in known and not _empty(value):
            problems.append(f"{field:.80}={value!r:.80} ({HINTS.get(field, 'lora-lite cannot compute it exactly')})")
    if problems:
        raise ValueError(f"{where}: this {peft_type} adapter uses PEFT features lora-lite cannot reproduce "
                         f"exactly, so it is not loaded: " + "; ".join(problems))


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_selection(d: dict, where: str) -> None:
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


def targets_of(d: dict, root: nn.Module, where: str) -> list[str]:
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
