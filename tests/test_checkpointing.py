"""Gradient checkpointing on a transformers model: the adapters get the gradients they get without it.

Reentrant checkpointing (`use_reentrant=True`) records a block only if one of its inputs requires
grad. With the whole base frozen (embedding included) none does, and adapters inside checkpointed
blocks silently get no gradient while any adapter outside them (here on lm_head) still trains.
attach puts a hook on the input embedding that marks its output as requiring grad, so this works
whether checkpointing is enabled before or after attach, and on transformers versions or models
that do not call `enable_input_require_grads` themselves (simulated by removing its hooks).
"""
import copy

import pytest
import tiny
import torch
from lora_lite.hook import inputs_require_grad
from tiny import VOCAB, llama, perturb

import lora_lite as ll

IDS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def hooked(name, **kw):
    torch.manual_seed(0)
    model = llama().train()
    ll.attach(model, tiny.cfg_for(name, **kw))
    perturb(model)
    return model


def adapter_grads(model):
    model.zero_grad(set_to_none=True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def checkpointing(model, reentrant):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.disable_input_require_grads()  # leave only lora-lite's hook: older transformers add none
    return model


def assert_same(got, ref):
    assert got.keys() == ref.keys() and ref
    for name, g in ref.items():
        assert got[name] is not None, f"{name} got no gradient"
        assert torch.allclose(got[name], g, atol=1e-6), f"{name}: {(got[name] - g).abs().max()}"


def test_non_reentrant_same_gradients(variant_name):
    model = hooked(variant_name)
    ref = adapter_grads(model)
    assert_same(adapter_grads(checkpointing(model, reentrant=False)), ref)


@pytest.mark.parametrize("order", ["checkpointing_then_attach", "attach_then_checkpointing"])
def test_reentrant_with_frozen_embedding_trains_every_adapter(order):
    targets = dict(exclude_names=(), target_names=(r"q_proj$", r"down_proj$", r"lm_head$"))
    ref = adapter_grads(hooked("lora", **targets))
    if order == "attach_then_checkpointing":
        model = checkpointing(hooked("lora", **targets), reentrant=True)
    else:
        torch.manual_seed(0)
        model = checkpointing(llama().train(), reentrant=True)
        ll.attach(model, tiny.cfg_for("lora", **targets))
        perturb(model)
    assert model.is_gradient_checkpointing
    assert_same(adapter_grads(model), ref)

    # the trap this guards against: without the hook only lm_head's adapter trains, with no error
    embed = model.get_input_embeddings()
    saved = dict(embed._forward_hooks)
    embed._forward_hooks.clear()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):  # torch's only signal
        silent = adapter_grads(model)
    embed._forward_hooks.update(saved)
    assert silent["lm_head.lora_A"] is not None
    assert all(g is None for n, g in silent.items() if ".layers." in n)


def test_detach_removes_the_embedding_hook_and_deepcopy_keeps_its_own():
    torch.manual_seed(0)
    model = llama().train()
    embed = model.get_input_embeddings()
    before = dict(embed._forward_hooks)
    ll.attach(model, tiny.cfg_for("lora"))
    assert [f for f in embed._forward_hooks.values() if f is inputs_require_grad]

    twin = checkpointing(copy.deepcopy(model), reentrant=True)
    assert all(g is not None for g in adapter_grads(twin).values())
    ll.detach(twin)
    assert not twin.get_input_embeddings()._forward_hooks
    assert [f for f in embed._forward_hooks.values() if f is inputs_require_grad]  # the original keeps its own

    ll.detach(model)
    assert dict(embed._forward_hooks) == before


def test_embedding_output_is_marked_only_while_checkpointing():
    """Marking the embedding output costs the first block's input gradients: only pay it when a block
    checkpoints (and turning checkpointing off again stops it)."""
    model = hooked("lora")
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    model(input_ids=IDS)
    checkpointing(model, reentrant=True)
    model(input_ids=IDS)
    model.gradient_checkpointing_disable()
    model(input_ids=IDS)
    assert seen == [False, True, False]
