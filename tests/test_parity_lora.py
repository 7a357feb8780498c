"""LoRA parity with PEFT 0.21 (`peft/tuners/lora/layer.py`): same tensors in, same outputs out (<= 1e-5 fp32)."""
import pytest
import tiny
import torch
from peft import LoraConfig, get_peft_model

import lora_lite as ll
from lora_lite.variant import kaiming

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_tensors(ref, name):
    layer = ref.base_model.model.get_submodule(name)
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def twins(use_rslora=False, r=4, alpha=8.0):
    """PEFT and lora-lite on two copies of one TinyLM, PEFT's tensors moved off init (B != 0) and copied into ours."""
    ref = get_peft_model(tiny.TinyLM(), LoraConfig(r=r, lora_alpha=alpha, target_modules=NAMES,
                                                   use_rslora=use_rslora))
    ours = tiny.TinyLM()
    handle = ll.attach(ours, ll.LoRAConfig(r=r, alpha=alpha, use_rslora=use_rslora))
    peft_names = {n.removeprefix("base_model.model.") for n, m in ref.named_modules() if hasattr(m, "lora_A")}
    assert peft_names == {t.name for t in handle.targets}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in ll.adapted_layers(ours):
            A, B = peft_tensors(ref, name)
            A.add_(0.1 * torch.randn(A.shape, generator=g))
            B.copy_(0.1 * torch.randn(B.shape, generator=g))
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
    return ref, ours


@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_match_peft(use_rslora):
    ref, ours = twins(use_rslora)
    ids = tiny.tokens()
    base = tiny.TinyLM()(ids)
    got = ours(ids)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapters really contribute
    torch.testing.assert_close(got, ref(ids), atol=1e-5, rtol=0)
    want_scale = 8.0 / (4**0.5 if use_rslora else 4)
    for name, layer in ll.adapted_layers(ours):
        assert ref.base_model.model.get_submodule(name).scaling["default"] == want_scale
        assert layer.lora_config.scale() == want_scale


def test_training_stays_in_parity():
    ref, ours = twins()
    ids = tiny.tokens()
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ref, ours)]
    for _ in range(5):
        losses = []
        for m, opt in zip((ref, ours), opts):
            opt.zero_grad()
            loss = tiny.lm_loss(m, ids)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5
    torch.testing.assert_close(ours(ids), ref(ids), atol=1e-5, rtol=0)
    for name, layer in ll.adapted_layers(ours):
        A, B = peft_tensors(ref, name)
        torch.testing.assert_close(layer.lora_A, A, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.lora_B, B, atol=1e-6, rtol=0)


def draw(like):
    t = torch.empty_like(like)
    kaiming(t)
    return t


def test_init_is_drawn_like_peft():
    """Replaying the generator shows both draw A with kaiming_uniform_(a=sqrt(5)) on (r, d_in), and B is zero.

    PEFT builds lora_A and lora_B as nn.Linear (two draws) before its reset draws A again;
    lora-lite draws A once per layer. Same draw, different number of throwaway draws before it.
    """
    model, ours = tiny.TinyLM(), tiny.TinyLM()
    torch.manual_seed(5)
    ref = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=NAMES))
    torch.manual_seed(5)
    ll.attach(ours, ll.LoRAConfig(r=4, alpha=8))
    layers = ll.adapted_layers(ours)
    assert len(layers) == 14
    torch.manual_seed(5)
    for name, layer in layers:
        A, B = peft_tensors(ref, name)
        draw(A), draw(B)  # PEFT's throwaway nn.Linear inits
        assert torch.equal(A, draw(A)), name
        assert not B.any() and not layer.lora_B.any()
    torch.manual_seed(5)
    for name, layer in layers:
        assert torch.equal(layer.lora_A, draw(layer.lora_A)), name
    bound = 1 / 32**0.5  # kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(d_in), 1/sqrt(d_in))
    A = ours.layers[0].q_proj.lora_A
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound
