"""SingLoRA against peft_singlora 0.2.0, and its step: ramp, track_steps, set_step, save/load, the step-0 warning."""
import copy
import warnings

import peft
import pytest
import tiny
import torch
from peft import get_peft_model
from peft_singlora import setup_singlora, update_singlora_global_step
from torch import nn

import lora_lite as ll
from lora_lite.variants.singlora import STEP_0

SHAPES = {"sq": (8, 8), "wide": (8, 12), "tall": (12, 8)}  # name: (d_in, d_out)


def step0_warnings(caught):
    return [w for w in caught if str(w.message) == STEP_0]


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        for name, (d_in, d_out) in SHAPES.items():
            setattr(self, name, nn.Linear(d_in, d_out))


def reference_config():
    """A peft LoraConfig made while setup_singlora's patch is active; the patch is undone at once
    (it is process-wide and would turn every later LoraConfig, e.g. PiSSA's parity test, into SingLoRA)."""
    original = peft.LoraConfig.__init__
    setup_singlora()
    try:
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(SHAPES))
    finally:
        peft.LoraConfig.__init__ = original


def pair(T):
    base = Three()
    ref = get_peft_model(copy.deepcopy(base), reference_config())
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.SingLoRAConfig(r=4, alpha=8.0, ramp_up_steps=T, target_names=(r"^(sq|wide|tall)$",),
                                      target_roles=()))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in SHAPES:
            r = getattr(ref.base_model.model, name)
            r.ramp_up_steps = T  # the reference ignores the config's value
            A = r.lora_A["default"]
            A.add_(0.1 * torch.randn(A.shape, generator=g))
            getattr(ours, name).lora_A.copy_(A)
    return ref, ours


@pytest.mark.parametrize("T,steps", [(1000, (0, 1, 437, 1000, 5000)), (7, (0, 3, 7, 9))])
def test_matches_reference_square_wide_tall(T, steps):
    ref, ours = pair(T)
    g = torch.Generator().manual_seed(2)
    for t in steps:
        update_singlora_global_step(ref, t)
        ll.set_step(ours, t)
        for name, (d_in, d_out) in SHAPES.items():
            r, o = getattr(ref.base_model.model, name), getattr(ours, name)
            assert o.lora_A.shape == (max(d_in, d_out), 4) and int(o.lora_step) == t
            x = torch.randn(2, 5, d_in, generator=g)
            torch.testing.assert_close(o(x), r(x), atol=1e-5, rtol=1e-5)
            delta = ll.REGISTRY["singlora"].delta_weight(o)
            torch.testing.assert_close(delta, r._get_update_weight("default"), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(o(x), nn.functional.linear(x, o.weight, o.bias) + x @ delta.T,
                                       atol=1e-5, rtol=1e-5)
            assert (delta.abs().max() > 0) == (t > 0)  # u(0) = 0: identity at step 0


def test_init_draws_reference_numbers():
    """Same seed, same A: Kaiming on (max(d_in, d_out), r), so bound 1/sqrt(r); the step is a 0-d int64 zero."""
    base = Three()
    torch.manual_seed(4)
    ref = get_peft_model(copy.deepcopy(base), reference_config())
    torch.manual_seed(4)
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.SingLoRAConfig(r=4, target_names=(r"^(sq|wide|tall)$",), target_roles=()))
    for name in SHAPES:
        o = getattr(ours, name)
        assert torch.equal(o.lora_A, getattr(ref.base_model.model, name).lora_A["default"])
        assert o.lora_A.abs().max() <= 0.5
        assert o.lora_step.dtype == torch.int64 and o.lora_step.shape == () and int(o.lora_step) == 0


def test_T0_means_fully_ramped_from_step_0():
    """The reference divides by zero at T=0; ours has u=1. Compare with the reference at T=1, step 1."""
    ref, ours = pair(0)
    update_singlora_global_step(ref, 1)
    for name in SHAPES:
        getattr(ref.base_model.model, name).ramp_up_steps = 1
    g = torch.Generator().manual_seed(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, (d_in, _) in SHAPES.items():
            o = getattr(ours, name)
            assert int(o.lora_step) == 0
            x = torch.randn(3, d_in, generator=g)
            torch.testing.assert_close(o(x), getattr(ref.base_model.model, name)(x), atol=1e-5, rtol=1e-5)
            assert torch.isfinite(ll.REGISTRY["singlora"].delta_weight(o)).all()
    assert not step0_warnings(caught)  # gradients do flow at T=0


def test_track_steps_with_accumulation_set_step_save_load_bf16(tmp_path):
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for("singlora"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = ll.track_steps(opt, model)
    ids = tiny.tokens()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for micro in ids.split(1):  # 4 micro-batches per optimizer step
                tiny.lm_loss(model, micro).backward()
            opt.step()
            opt.zero_grad()
    assert not step0_warnings(caught)
    layers = ll.adapted_layers(model)
    assert len(layers) == 14 and all(int(m.lora_step) == 3 for _, m in layers)
    handle.remove()
    opt.step()
    assert all(int(m.lora_step) == 3 for _, m in layers)
    ll.set_step(model, 50)
    assert all(int(m.lora_step) == 50 for _, m in layers)
    with pytest.raises(ValueError, match="step must be >= 0"):
        ll.set_step(model, -1)
    ll.save(model, tmp_path / "a.safetensors")
    want = model(ids)
    ll.detach(model)
    ll.load(model, tmp_path / "a.safetensors")
    assert ll.adapted_layers(model)[0][1].lora_config.ramp_up_steps == 10  # travels in the saved config
    assert all(int(m.lora_step) == 50 for _, m in ll.adapted_layers(model))
    torch.testing.assert_close(model(ids), want, atol=0, rtol=0)
    model.to(torch.bfloat16)
    assert all(m.lora_step.dtype == torch.int64 and int(m.lora_step) == 50 for _, m in ll.adapted_layers(model))


def test_step0_warning_once_when_never_advanced():
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for("singlora"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny.tokens()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(ids)  # no gradient flows: nothing to say
        model(ids)  # nor without a backward (e.g. an identity check before ll.track_steps)
        assert not step0_warnings(caught)
        for i in range(3):
            tiny.lm_loss(model, ids).backward()
            opt.step()
            opt.zero_grad()
            if i == 0:
                first = len(step0_warnings(caught))
    assert first > 0 and len(step0_warnings(caught)) == first  # only on the first training forward
    assert "ll.track_steps" in STEP_0 and "ll.set_step" in STEP_0
    assert all(m.lora_A.grad is None or not m.lora_A.grad.any() for _, m in ll.adapted_layers(model))
    with warnings.catch_warnings(record=True) as caught:  # as a user sees it: the default filter shows it once
        warnings.simplefilter("default")
        fresh = tiny.TinyLM()
        ll.attach(fresh, tiny.cfg_for("singlora"))
        tiny.lm_loss(fresh, ids).backward()
    assert len(step0_warnings(caught)) == 1


def test_no_warning_after_set_step_or_loaded_step(tmp_path):
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for("singlora"))
    ll.set_step(model, 0)  # the user drives the schedule
    ids = tiny.tokens()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny.lm_loss(model, ids).backward()
        ll.set_step(model, 5)
        ll.save(model, tmp_path / "a.safetensors")
        loaded = tiny.TinyLM()
        ll.load(loaded, tmp_path / "a.safetensors")
        tiny.lm_loss(loaded, ids).backward()
    assert not step0_warnings(caught)


def test_deepcopy_of_tracked_model_is_independent_and_works():
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for("singlora"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ll.track_steps(opt, model)
    ids = tiny.tokens()
    tiny.lm_loss(model, ids).backward()
    opt.step()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(ids), model(ids), atol=0, rtol=0)
    ll.set_step(twin, 2)
    assert int(model.layers[0].q_proj.lora_step) == 1 and int(twin.layers[0].q_proj.lora_step) == 2
    assert not torch.equal(twin(ids), model(ids))
    twin_opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    before = tiny.lm_loss(twin, ids).item()
    for _ in range(3):
        tiny.lm_loss(twin, ids).backward()
        twin_opt.step()
        twin_opt.zero_grad()
    assert tiny.lm_loss(twin, ids).item() < before
    ll.detach(twin)
    assert ll.adapted_layers(model) and not ll.adapted_layers(twin)
