"""`ll.disabled(model)`: inside the block the model is the bare base, bit for bit (a DPO or KL reference
pass, an ablation), and the adapter is live again after it, whatever the block raised.

Each adapted layer's `lora_state` holds the count of disabled blocks around it. While it is non-zero the
adapter hook returns the layer's own output untouched, so no adapter tensor enters the graph and none gets
a gradient. A count, not a flag, makes blocks nest: an inner exit leaves the layers disabled until the
outer one exits. A detach inside the block takes `lora_state` with it, so nothing is left behind.
The outermost block also puts the original values of the `modules_to_save` back for its duration.

Why a value the hook reads rather than removing the hooks: dynamo does not guard on a module's hooks
(`torch._dynamo.config.skip_nnmodule_hook_guards`), so a compiled model would keep running the removed
adapter. It guards on what the hook reads from `lora_state`, so the first disabled call of a compiled model
compiles a second graph and both are reused from then on (`tests/test_workflows.py` counts the frames).
"""
from __future__ import annotations

import contextlib

from torch import nn

from . import modules_to_save
from .state import DISABLED, adapted_layers, saved_modules
from .wrappers import unwrap


@contextlib.contextmanager
def disabled(model: nn.Module):
    """`with ll.disabled(model):` — the base model exactly, adapters off; restored on exit, also on error."""
    states = [layer.lora_state for _, layer in adapted_layers(model)]
    if not states:
        raise ValueError("ll.disabled: no adapter is attached to this model, so there is nothing to disable "
                         "(attach or load one first; the model already computes its base)")
    root, held, exchanged = unwrap(model), [], False
    try:
        for state in states:
            state[DISABLED] = state.get(DISABLED, 0) + 1
            held.append(state)  # only what was counted up is counted down: an interrupt here stays exact
        if saved_modules(root) and not root.__dict__.get(modules_to_save.EXCHANGED):  # the outermost block
            modules_to_save.exchange(root)
            exchanged = True
        yield
    finally:
        if exchanged and root.__dict__.get(modules_to_save.EXCHANGED):  # (not if detached inside the block)
            modules_to_save.exchange(root)
        for state in held:
            left = state.get(DISABLED, 0) - 1
            if left > 0:
                state[DISABLED] = left
            else:
                state.pop(DISABLED, None)
