"""attach records what it adds, and detach removes exactly that: nothing of the user's, nothing left behind,
also after a failure half-way through one layer or an interrupted detach."""
import pytest
import torch
from torch import nn

import lora_lite as ll
import tiny
from lora_lite import lifecycle, state
from tiny import assert_restored, snapshot


def test_a_users_own_lora_attributes_survive_attach_and_detach(variant_name):
    model = tiny.TinyLM()
    q = model.layers[0].q_proj
    q.lora_scale = 0.5  # the user's: an attribute, a buffer and a parameter with lora_ names
    q.register_buffer("lora_mask", torch.ones(3))
    q.register_parameter("lora_mine", nn.Parameter(torch.zeros(2)))
    ll.attach(model, tiny.cfg_for(variant_name))
    assert "lora_mine" not in state.lora_tensors(q)  # not the adapter's: not saved, not removed
    ll.detach(model)
    assert q.lora_scale == 0.5 and torch.equal(q.lora_mask, torch.ones(3)) and "lora_mine" in q._parameters
    assert ll.adapted_layers(model) == [] and "lora_added" not in q.__dict__


def test_a_name_attach_would_overwrite_is_refused():
    model = tiny.TinyLM()
    model.layers[1].v_proj.lora_A = "mine"
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layers\.1\.v_proj already has \['lora_A'\]"):
        ll.attach(model, ll.LoRAConfig(r=2))
    tiny.assert_unchanged(model, snap)  # everything as it was, and the user's lora_A kept
    assert model.layers[1].v_proj.lora_A == "mine"


def test_failure_between_two_tensors_of_one_layer_leaves_nothing(monkeypatch, variant_name):
    model = tiny.TinyLM()
    snap = snapshot(model)
    real, calls = lifecycle._new_tensor, []

    def fail_on_second(spec, cfg, t, key):  # out of memory on the second tensor of the third layer
        calls.append(key)
        if len(calls) == 2 * 2 + 2:
            raise MemoryError(f"cannot allocate {key}")
        return real(spec, cfg, t, key)

    monkeypatch.setattr(lifecycle, "_new_tensor", fail_on_second)
    with pytest.raises(MemoryError):
        ll.attach(model, tiny.cfg_for(variant_name))
    assert_restored(model, snap)


def test_an_interrupted_detach_is_finished_by_the_next(monkeypatch):
    model = tiny.TinyLM()
    snap = snapshot(model)
    ll.attach(model, ll.LoRAConfig(r=2))
    real, seen = state.remove_added, []

    def interrupt_on_third(layer):
        seen.append(layer)
        if len(seen) == 3:
            raise KeyboardInterrupt
        real(layer)

    monkeypatch.setattr(lifecycle, "remove_added", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        ll.detach(model)
    assert state.FLAGS in model.__dict__  # the requires_grad flags are not forgotten before they are restored
    with pytest.raises(ValueError, match="detach was interrupted"):
        ll.attach(model, ll.LoRAConfig(r=2))
    monkeypatch.setattr(lifecycle, "remove_added", real)
    ll.detach(model)
    assert_restored(model, snap)


def test_attach_refuses_a_peft_model():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny.TinyLM(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PEFT adapters.*merge_and_unload"):
        ll.attach(peft_model, ll.LoRAConfig(r=2))
