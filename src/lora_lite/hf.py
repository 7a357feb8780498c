"""Optional transformers integration: a plain Trainer trains, checkpoints (adapter only, no base copy) and
resumes a lora-lite adapter exactly, and trains on a quantized base. Imports transformers; the rest of
lora-lite does not.

    from lora_lite.hf import AdapterCallback, allow_quantized_training

    ll.attach(model, cfg)
    with allow_quantized_training(model):          # only needed for a 4-bit / 8-bit base
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdapterCallback()])
    trainer.train()                                # checkpoint-N/adapter.safetensors at every save
    trainer.train(resume_from_checkpoint=True)     # continues exactly
"""
from __future__ import annotations

import contextlib
import os

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_file import save
from .schedule import set_step
from .state import adapted_layers
from .wrappers import unwrap

PEFT_FLAG = "_hf_peft_config_loaded"
IGNORE = "_keys_to_ignore_on_save"  # transformers drops these state_dict keys in save_pretrained


class AdapterCallback(TrainerCallback):
    """Everything a plain `Trainer` needs to train a lora-lite adapter, checkpoint it and resume exactly.

    - Step-scheduled variants (SingLoRA's ramp) follow Trainer's `global_step`, the count of optimizer
      steps: set at train begin (0, or the resumed step) and after every optimizer step, so gradient
      accumulation and resuming need nothing more.
    - Each checkpoint gets the adapter file (`ll.save`), loadable alone with `ll.load(base, path)`.
    - Checkpoints hold no copy of the frozen base. Mechanism: transformers' own `_keys_to_ignore_on_save`,
      set on this model instance (not the class) for the length of `train()`; `save_pretrained` drops those
      keys, so `model.safetensors` holds only the `lora_*` tensors (and `modules_to_save`), beside Trainer's
      optimizer, scheduler, RNG and trainer state. Resuming needs no override either: Trainer's
      `_load_from_checkpoint` and `_load_best_model` load that file with `load_state_dict(strict=False)`,
      which restores the adapter (SingLoRA's step included) into the model the user attached, and the base
      it leaves alone is the one already in memory (Trainer logs those keys as missing). Chosen over
      deleting the base file in `on_save` (written, then removed) and over patching Trainer's `_save`.
      The attribute is restored at train end: a later `save_pretrained` writes the whole model again.
    Only the main process writes the adapter file.
    """

    def __init__(self, filename: str = "adapter.safetensors"):
        self.filename = filename
        self._saved_ignore = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        root = unwrap(model)
        if not adapted_layers(root):
            raise ValueError("AdapterCallback: no lora-lite adapter is attached; ll.attach(model, cfg) "
                             "before trainer.train()")
        trained = {n for n, p in root.named_parameters() if p.requires_grad}
        keep = trained | {n for n in root.state_dict() if n.rsplit(".", 1)[-1].startswith("lora_")}
        self._saved_ignore = (IGNORE in vars(root), vars(root).get(IGNORE))
        old = set(getattr(root, IGNORE, None) or ())
        vars(root)[IGNORE] = old | {n for n in root.state_dict() if n not in keep}
        set_step(root, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        set_step(unwrap(model), state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save(model, os.path.join(folder, self.filename))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        root = unwrap(model)
        if self._saved_ignore is None:
            return
        had, before = self._saved_ignore
        if had:
            vars(root)[IGNORE] = before
        else:
            vars(root).pop(IGNORE, None)
        self._saved_ignore = None


SaveAdapterCallback = AdapterCallback  # the earlier name


@contextlib.contextmanager
def allow_quantized_training(model: nn.Module):
    """Let `Trainer(model=...)` accept a quantized model that carries a lora-lite adapter.

    `Trainer.__init__` refuses a model with `is_quantized` set (a bitsandbytes load through
    `BitsAndBytesConfig`) unless it is a PEFT model or has `_hf_peft_config_loaded` set: that is how
    `transformers.trainer_utils.validate_quantization_for_training` tells "trainable adapters
    attached" from "training packed weights", which it cannot do. This checks the first for real (an
    adapter is attached, it has trainable parameters, and no base parameter is trainable), then sets
    the flag for the `with` block only. Left set, `save_pretrained` would take its PEFT path and ask
    for a PEFT config that lora-lite does not have; Trainer reads the flag nowhere after `__init__`.
    """
    root = unwrap(model)
    layers = adapted_layers(root)
    if not layers:
        raise ValueError("no lora-lite adapter is attached: ll.attach(model, cfg) before building the Trainer")
    trainable = [n for n, p in root.named_parameters() if p.requires_grad]
    base = [n for n in trainable if not n.rsplit(".", 1)[-1].startswith("lora_")]
    if base or not trainable:
        raise ValueError(f"a quantized base must be frozen with trainable adapter parameters; trainable base "
                         f"parameters: {base[:5]}, trainable adapter parameters: {len(trainable) - len(base)}")
    had, before = PEFT_FLAG in vars(root), vars(root).get(PEFT_FLAG)  # transformers' default is a class attribute
    vars(root)[PEFT_FLAG] = True
    try:
        yield model
    finally:
        if had:
            vars(root)[PEFT_FLAG] = before
        else:
            vars(root).pop(PEFT_FLAG, None)
