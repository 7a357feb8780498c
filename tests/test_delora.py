"""DeLoRA against PEFT's `DeloraConfig`: same weight norms, same outputs and ΔW away from init."""
import copy

import tiny
import torch
from peft import DeloraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_lite as ll

NAMES = ("q_proj", "v_proj", "up_proj", "down_proj")  # square, wide and tall layers


def test_matches_peft_away_from_init():
    ours = tiny.TinyLM()
    theirs = get_peft_model(copy.deepcopy(ours), DeloraConfig(r=4, delora_lambda=15, target_modules=list(NAMES)))
    ll.attach(ours, tiny.cfg_for("delora", lambda0=15.0, target_roles=(),
                                 target_names=(rf"\.({'|'.join(NAMES)})$",)))
    assert len(ll.adapted_layers(ours)) == 2 * len(NAMES)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in ll.adapted_layers(ours):
            peft_layer = theirs.get_submodule(f"base_model.model.{name}")
            assert torch.equal(layer.lora_wnorm, peft_layer.delora_w_norm["default"])
            assert torch.equal(layer.lora_lambda, peft_layer.delora_lambda["default"])
            for key in ("A", "B"):
                t = getattr(peft_layer, f"delora_{key}")["default"]
                t.copy_(torch.randn(t.shape, generator=g))
                getattr(layer, f"lora_{key}").copy_(t)
            peft_layer.delora_lambda["default"].fill_(3.0 + torch.rand(1, generator=g).item())
            layer.lora_lambda.copy_(peft_layer.delora_lambda["default"])
            torch.testing.assert_close(layer.lora_variant.delta_weight(layer), peft_layer.get_delta_weight("default"),
                                       rtol=0, atol=1e-5)
        ids = tiny.tokens()
        out = ours(ids)
        assert not torch.allclose(out, tiny.TinyLM()(ids), atol=1e-3)  # the adapter really acts
        torch.testing.assert_close(out, theirs(ids), rtol=0, atol=1e-5)


def test_identity_at_init_and_norm_bound():
    model = tiny.TinyLM()
    ids = tiny.tokens()
    before = model(ids)
    ll.attach(model, tiny.cfg_for("delora"))
    assert torch.equal(model(ids), before)
    layer = ll.adapted_layers(model)[0][1]
    with torch.no_grad():
        layer.lora_B.normal_()
        # r rank-1 terms of norm λ/r each: ‖ΔW / w‖ <= λ, and about λ/√r when they are near-orthogonal,
        # whatever the scale of B (docs/variants.md: the first-step jump)
        lam, r = layer.lora_lambda.item(), layer.lora_config.r
        norm = torch.linalg.norm(layer.lora_variant.delta_weight(layer) / layer.lora_wnorm).item()
        assert norm <= lam + 1e-5 and abs(norm - lam / r**0.5) < 0.2 * lam / r**0.5


def test_conv1d_column_norms():
    class GPT2ish(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = Conv1D(24, 16)  # 16 -> 24, stored (d_in, d_out) = (16, 24)

        def forward(self, x):
            return self.c_fc(x)

    torch.manual_seed(0)
    model = GPT2ish()
    ll.attach(model, tiny.cfg_for("delora", target_roles=(), target_names=("c_fc",)))
    expected = torch.stack([torch.linalg.norm(model.c_fc.weight[j]) for j in range(16)])  # row j = input j
    torch.testing.assert_close(model.c_fc.lora_wnorm, expected)
    x = torch.randn(3, 16)
    with torch.no_grad():
        model.c_fc.lora_B.normal_()
        y = model(x)
        delta = model.c_fc.lora_variant.delta_weight(model.c_fc)
        torch.testing.assert_close(y, x @ (model.c_fc.weight + delta.t()) + model.c_fc.bias, rtol=0, atol=1e-5)
