"""GraLoRA against PEFT 0.21 (`GraloraConfig`, peft/tuners/gralora/layer.py): init, outputs, delta_weight, errors."""
import copy

import pytest
import torch
from peft import GraloraConfig, get_peft_model
from torch import nn

import lora_lite as ll


class TwoLayers(nn.Module):
    """Non-square both ways; every width divisible by 4."""

    def __init__(self, d_in=16, d_out=24):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(d_in, d_out), nn.Linear(d_out, d_in)


def ours_cfg(**kw):
    return ll.GraLoRAConfig(r=8, alpha=16.0, target_names=(r"^(up|down)$",), target_roles=(), **kw)


def pair(k, hybrid_r, seed=0):
    """(reference PEFT model, ours) built from the same seed, then the reference's tensors perturbed and copied."""
    base = TwoLayers()
    torch.manual_seed(seed)
    ref = get_peft_model(copy.deepcopy(base), GraloraConfig(r=8, alpha=16, gralora_k=k, hybrid_r=hybrid_r,
                                                             target_modules=["up", "down"]))
    ours = copy.deepcopy(base)
    ll.attach(ours, ours_cfg(k=k, hybrid_r=hybrid_r))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in ("up", "down"):
            r, o = getattr(ref.base_model.model, name), getattr(ours, name)
            theirs = {"lora_A": r.gralora_A["default"], "lora_B": r.gralora_B["default"]}
            if hybrid_r:
                theirs |= {"lora_A_general": r.gralora_A_general["default"].weight,
                           "lora_B_general": r.gralora_B_general["default"].weight}
            assert set(theirs) == {k for k in o._parameters if k.startswith("lora_")}
            for key, t in theirs.items():
                t.add_(0.1 * torch.randn(t.shape, generator=g))  # B starts at zero: move it
                getattr(o, key).copy_(t)
    return ref, ours


def test_init_draws_peft_numbers():
    """Same seed, same A (each block's (r, d_in/k) Kaiming, transposed); B zeros."""
    for k in (2, 4):
        base = TwoLayers()
        torch.manual_seed(3)
        ref = get_peft_model(copy.deepcopy(base),
                             GraloraConfig(r=8, alpha=16, gralora_k=k, target_modules=["up", "down"]))
        torch.manual_seed(3)
        ours = copy.deepcopy(base)
        ll.attach(ours, ours_cfg(k=k))
        for name in ("up", "down"):
            r, o = getattr(ref.base_model.model, name), getattr(ours, name)
            assert torch.equal(o.lora_A, r.gralora_A["default"])
            assert o.lora_B.shape == r.gralora_B["default"].shape and not o.lora_B.any()


def test_hybrid_init_and_param_count():
    ours = TwoLayers(64, 128)
    ll.attach(ours, ours_cfg(k=2, hybrid_r=4))
    up = ours.up
    assert up.lora_A.shape == (2, 32, 8) and up.lora_B.shape == (2, 8, 64)
    assert up.lora_A_general.shape == (4, 64) and up.lora_B_general.shape == (128, 4)
    assert not up.lora_B.any() and not up.lora_B_general.any()
    assert up.lora_A.abs().max() <= 32 ** -0.5 < 1.1 * up.lora_A.abs().max()  # fan_in d_in/k
    assert up.lora_A_general.abs().max() <= 64 ** -0.5 < 1.1 * up.lora_A_general.abs().max()
    n = sum(p.numel() for k, p in up.named_parameters() if k.startswith("lora_"))
    assert n == (8 + 4) * (64 + 128)  # r (d_in + d_out) for GraLoRA, as LoRA's, plus the hybrid pair


@pytest.mark.parametrize("k,hybrid_r", [(2, 0), (4, 0), (2, 4), (4, 4)])
def test_matches_peft_on_3d_and_2d_input(k, hybrid_r):
    ref, ours = pair(k, hybrid_r)
    g = torch.Generator().manual_seed(7)
    for name, d_in in (("up", 16), ("down", 24)):
        for shape in ((2, 5, d_in), (3, d_in)):
            x = torch.randn(shape, generator=g)
            want = getattr(ref.base_model.model, name)(x)
            got = getattr(ours, name)(x)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        base_out = nn.functional.linear(x, getattr(ours, name).weight, getattr(ours, name).bias)
        assert (got - base_out).abs().max() > 1e-2  # the adapter contributes


@pytest.mark.parametrize("k,hybrid_r", [(2, 0), (4, 4)])
def test_delta_weight_matches_forward_and_peft(k, hybrid_r):
    ref, ours = pair(k, hybrid_r)
    x = torch.randn(6, 16)
    layer = ours.up
    delta = ll.REGISTRY["gralora"].delta_weight(layer)
    torch.testing.assert_close(delta, ref.base_model.model.up.get_delta_weight("default"), atol=1e-6, rtol=1e-5)
    y = nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), y + x @ delta.T, atol=1e-5, rtol=1e-5)


def test_scale_counts_hybrid_r_outside_r():
    """s = alpha / (r + hybrid_r) with r the GraLoRA rank, as PEFT (the seed fork counted hybrid_r inside r)."""
    ref, _ = pair(2, 4)
    assert ref.base_model.model.up.scaling["default"] == 16 / (8 + 4)
    from lora_lite.variants.gralora import scale
    assert scale(ours_cfg(k=2, hybrid_r=4)) == 16 / (8 + 4)


def test_k_not_dividing_names_field_and_layer():
    model = TwoLayers(90, 16)
    with pytest.raises(ValueError, match=r"GraLoRA k=4 does not divide d_in=90.*up"):
        ll.attach(model, ours_cfg(k=4))
    assert ll.adapted_layers(model) == []
    with pytest.raises(ValueError, match=r"GraLoRA k=4 does not divide d_out=18.*up"):
        ll.attach(TwoLayers(16, 18), ours_cfg(k=4))
    with pytest.raises(ValueError, match=r"k=3 does not divide r=8"):
        ours_cfg(k=3)
    with pytest.raises(ValueError, match="hybrid_r"):
        ours_cfg(hybrid_r=-1)
