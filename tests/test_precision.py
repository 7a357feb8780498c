"""Mixed precision: CPU bf16 autocast, bf16 adapters on an fp32 base, fp32 adapters on a bf16 base.

In each case the output has the dtype the base alone would produce, is finite and near the fp32
result, and every adapter parameter gets a gradient of its own dtype.
"""
import contextlib

import pytest
import tiny
import torch
from tiny import perturb

import lora_lite as ll

BF16 = torch.bfloat16
CASES = {  # name: (base dtype, adapter dtype, autocast)
    "autocast": (torch.float32, torch.float32, True),
    "bf16_adapter_fp32_base": (torch.float32, BF16, False),
    "fp32_adapter_bf16_base": (BF16, torch.float32, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixed_precision(variant_name, case):
    base_dtype, adapter_dtype, autocast = CASES[case]
    ids = tiny.tokens()
    ref = tiny.TinyLM()
    ll.attach(ref, tiny.cfg_for(variant_name))
    perturb(ref)
    expected = ref(ids)

    model = tiny.TinyLM().to(base_dtype)
    ctx = torch.autocast("cpu", dtype=BF16) if autocast else contextlib.nullcontext()
    with ctx:
        base_out = model(ids)
    ll.attach(model, tiny.cfg_for(variant_name, dtype=adapter_dtype))
    with torch.no_grad():  # the same adapter as ref, rounded to the adapter dtype
        for key, t in tiny.lora_tensors(model).items():
            t.copy_(tiny.lora_tensors(ref)[key])
    with ctx:
        out = model(ids)
        loss = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()

    assert out.dtype == base_out.dtype
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), expected, atol=0.1, rtol=0.05), (out.float() - expected).abs().max()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("lora_") for n, _ in trainable)
    for name, p in trainable:
        assert p.dtype == adapter_dtype and p.grad is not None and p.grad.dtype == adapter_dtype, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_model_to_bf16_after_attach(variant_name):
    """`model.to(torch.bfloat16)` after attach casts the adapter too (as PEFT does): the adapter then computes
    in bf16, trains, and its int64 step buffers stay int64."""
    ids = tiny.tokens()
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for(variant_name))
    perturb(model)
    expected = model(ids)
    model.to(BF16)
    out = model(ids)
    assert out.dtype == BF16 and torch.allclose(out.float(), expected, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == BF16 and torch.isfinite(g).all() for g in grads)
    assert all(b.dtype in (BF16, torch.int64) for n, b in model.named_buffers() if ".lora_" in n)
