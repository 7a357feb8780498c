"""Optional transformers integration: the adapter file in every Trainer checkpoint, and Trainer on a
quantized base. Imports transformers; the rest of lora-lite does not.

    from lora_lite.hf import SaveAdapterCallback, allow_quantized_training

    ll.attach(model, cfg)
    with allow_quantized_training(model):          # only needed for a 4-bit / 8-bit base
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SaveAdapterCallback()])
    trainer.train()                                # checkpoint-N/adapter.safetensors at every save
"""
from __future__ import annotations

import contextlib
import os

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_file import save
from .state import adapted_layers
from .wrappers import unwrap

PEFT_FLAG = "_hf_peft_config_loaded"


class SaveAdapterCallback(TrainerCallback):
    """On each Trainer save, write the adapter alone (`ll.save`) into the checkpoint folder.

    `ll.load(base_model, "out/checkpoint-500/adapter.safetensors")` then restores it without the rest
    of the checkpoint. Only the main process writes.
    """

    def __init__(self, filename: str = "adapter.safetensors"):
        self.filename = filename

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save(model, os.path.join(folder, self.filename))


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
