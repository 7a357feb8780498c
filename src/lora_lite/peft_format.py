"""PEFT adapter folders: what they hold and how to tell one (shared by peft_export and peft_import).

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

import os

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
HINTS = {"use_dora": "lora-lite has no DoRA", "rank_pattern": "per-module ranks import for PEFT's LoRA only",
         "alpha_pattern": "per-module alphas import for PEFT's LoRA only"}



def peft_key(module: str, suffix: str) -> str:
    return f"{PREFIX}{module}.{suffix}"


def is_peft_adapter(path: str | os.PathLike) -> bool:
    """A folder, or the adapter_model.safetensors / adapter_config.json in one, with the config beside it."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        return False  # read() refuses it, naming the type
    path = os.fspath(path)
    if os.path.isdir(path):
        return True
    return os.path.basename(path) in (WEIGHTS, CONFIG) and os.path.isfile(os.path.join(os.path.dirname(path), CONFIG))

