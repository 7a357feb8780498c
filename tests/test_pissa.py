"""PiSSA against PEFT's `init_lora_weights="pissa"` / `"pissa_niter_4"`, which mutates its copy of the base.

Ours keeps W and subtracts B0 A0 in the forward; the two models must compute the same function at init
and after identical training, while our base stays bit for bit what it was.
"""
import copy

import pytest
import tiny
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_lite as ll
from lora_lite.weights import dense_weight

NAMES = ("q_proj", "v_proj", "up_proj", "down_proj")  # square, wide and tall layers


def pair(init, niter):
    """(ours, PEFT's) on the same TinyLM; ours attached to the untouched original."""
    ours = tiny.TinyLM()
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    theirs = get_peft_model(copy.deepcopy(ours), LoraConfig(r=4, lora_alpha=8, target_modules=list(NAMES),
                                                            init_lora_weights=init))
    ll.attach(ours, tiny.cfg_for("pissa", niter=niter, target_roles=(),
                                 target_names=(rf"\.({'|'.join(NAMES)})$",)))
    return ours, theirs, base


def peft_factors(theirs):
    """{module name: (A, B)} of PEFT's LoRA layers, by our module names."""
    return {n.removeprefix("base_model.model."): (m.lora_A["default"].weight, m.lora_B["default"].weight)
            for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def adamw_steps(model, ids, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        tiny.lm_loss(model, ids).backward()
        opt.step()


@pytest.mark.parametrize("init, niter", [("pissa", None), ("pissa_niter_4", 4)])
def test_matches_peft_at_init_and_after_training(init, niter):
    ours, theirs, base = pair(init, niter)
    factors = peft_factors(theirs)
    assert len(factors) == 2 * len(NAMES) and len(ll.adapted_layers(ours)) == 2 * len(NAMES)
    # The full SVD is deterministic: our own init must equal PEFT's. The randomized one draws from the RNG
    # in a different order, so there we start both from PEFT's factors.
    with torch.no_grad():
        for name, layer in ll.adapted_layers(ours):
            A, B = factors[name]
            if niter is None:
                torch.testing.assert_close(layer.lora_A, A, rtol=0, atol=1e-6)
                torch.testing.assert_close(layer.lora_B, B, rtol=0, atol=1e-6)
            for key, value in (("lora_A", A), ("lora_B", B), ("lora_A0", A), ("lora_B0", B)):
                getattr(layer, key).copy_(value)
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items() if k in base)
    ids = tiny.tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids), rtol=0, atol=1e-5)
    adamw_steps(ours, ids)
    adamw_steps(theirs, ids)
    with torch.no_grad():
        assert not torch.equal(ll.adapted_layers(ours)[0][1].lora_B, ll.adapted_layers(ours)[0][1].lora_B0)
        torch.testing.assert_close(ours(ids), theirs(ids), rtol=0, atol=1e-5)
        for name, layer in ll.adapted_layers(ours):  # W + ΔW is PEFT's W_res + s B A
            torch.testing.assert_close(layer.weight + layer.lora_variant.delta_weight(layer),
                                       theirs.get_submodule(f"base_model.model.{name}").get_delta_weight("default")
                                       + theirs.get_submodule(f"base_model.model.{name}.base_layer").weight,
                                       rtol=0, atol=1e-5)
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items() if k in base)


def test_identity_is_exact_at_init():
    model = tiny.TinyLM()
    ids = tiny.tokens()
    before = model(ids)
    ll.attach(model, tiny.cfg_for("pissa", niter=None))
    assert torch.equal(model(ids), before)


def test_randomized_svd_close_to_full():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 48))
    V, _ = torch.linalg.qr(torch.randn(48, 48))
    layer = nn.Sequential(nn.Linear(48, 64))
    with torch.no_grad():
        layer[0].weight.copy_(U @ torch.diag(0.7 ** torch.arange(48.0)) @ V.t())  # decaying spectrum

    def principal(niter):
        with ll.attached(layer, tiny.cfg_for("pissa", r=6, niter=niter, target_roles=())):
            return layer[0].lora_B0 @ layer[0].lora_A0

    full, fast = principal(None), principal(4)
    assert torch.linalg.norm(fast - full) / torch.linalg.norm(full) < 0.02


def test_rank_above_layer_width_names_the_layer():
    model = tiny.TinyLM()  # d = 32
    with pytest.raises(ValueError, match=r"r=40 is more than min\(d_in, d_out\)=32.*layers\.0\.q_proj"):
        ll.attach(model, tiny.cfg_for("pissa", r=40))
    assert ll.adapted_layers(model) == []


def test_conv1d_matches_peft_fan_in_fan_out():
    class GPT2ish(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = Conv1D(24, 16)  # 16 -> 24, weight stored (d_in, d_out)

        def forward(self, x):
            return self.c_fc(x)

    torch.manual_seed(0)
    ours = GPT2ish()
    theirs = get_peft_model(copy.deepcopy(ours), LoraConfig(r=4, lora_alpha=8, target_modules=["c_fc"],
                                                            fan_in_fan_out=True, init_lora_weights="pissa"))
    ll.attach(ours, tiny.cfg_for("pissa", niter=None, target_roles=(), target_names=("c_fc",)))
    peft_layer = theirs.base_model.model.c_fc
    torch.testing.assert_close(ours.c_fc.lora_A, peft_layer.lora_A["default"].weight, rtol=0, atol=1e-6)
    with torch.no_grad():
        for model in (ours, theirs):  # move off init the same way in both
            next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.1)
        x = torch.randn(3, 16)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_quantized_base_reads_the_dequantized_weight():
    import bitsandbytes as bnb

    float_layer = nn.Linear(64, 32)
    model = nn.Sequential(bnb.nn.Linear4bit(64, 32, quant_type="nf4"))
    model[0].load_state_dict(float_layer.state_dict())
    model = model.to("cpu")  # quantizes
    x = torch.randn(3, 64)
    before = model(x)
    ll.attach(model, tiny.cfg_for("pissa", niter=None, target_roles=()))
    assert torch.equal(model(x), before)
    W = dense_weight(model[0])
    U, S, Vh = torch.linalg.svd(W)
    principal = model[0].lora_B0 @ model[0].lora_A0 * 2.0  # s = alpha / r = 2
    torch.testing.assert_close(principal, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], rtol=0, atol=1e-5)
