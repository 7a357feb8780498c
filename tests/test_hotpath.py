"""The fast path adds the adapter into the layer's output in place (lora.add_low_rank, adapter._hook).

That must be invisible: outputs and gradients equal the dense update's on 2-D, 3-D and 4-D inputs (the
LowRankAdd Function, the no-grad addmm_ and the out-of-place branches), and a hook that saw the base output
first keeps it intact.
"""
import itertools

import pytest
import tiny
import torch
import torch.nn.functional as F

import lora_lite as ll
from lora_lite import low_rank
from lora_lite.low_rank import add_low_rank


def adapted(name):
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for(name))
    ll.set_step(model, 5)  # SingLoRA: mid-ramp, so its update is not zero
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in tiny.lora_tensors(model).values():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model


@pytest.mark.parametrize("shape", [(5, 32), (2, 5, 32), (2, 3, 5, 32)])
def test_in_place_add_matches_the_dense_update(variant_name, shape):
    model = adapted(variant_name)
    layer = model.layers[0].up_proj  # 32 -> 64
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4), requires_grad=True)
    g = torch.randn(*shape[:-1], 64, generator=torch.Generator().manual_seed(5))

    got = layer(x)
    got_grads = torch.autograd.grad((got * g).sum(), [x, *params])
    want = F.linear(x, layer.weight, layer.bias) + x @ layer.lora_variant.delta_weight(layer).t()
    want_grads = torch.autograd.grad((want * g).sum(), [x, *params])

    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


GRAD_CASES = [(n, True) for n in itertools.product([False, True], repeat=4) if any(n)] + [
    ((y, h, False, B), False) for y, h, B in itertools.product([False, True], repeat=3) if y or h or B]


@pytest.mark.parametrize("r", [3, 8], ids=["r3", "r8"])  # either side of low_rank.RANK_LEFT: both layouts
@pytest.mark.parametrize(("needs", "with_A"), GRAD_CASES)
def test_low_rank_add_is_one_node_with_the_dense_gradients(needs, with_A, r):
    """needs: which of y, x, A, B require grad; without A, x is h itself."""
    assert (r in low_rank.RANK_LEFT) == (r == 8)
    g = torch.Generator().manual_seed(6)
    y, x, A, B = (torch.randn(shape, generator=g) for shape in ((2, 5, 12), (2, 5, 9), (r, 9), (12, r)))
    if not with_A:
        x, A = x[..., :r].contiguous(), None
    leaves = [t.requires_grad_(n) for t, n in zip((y, x, A, B), needs) if t is not None]
    out_grad = torch.randn(2, 5, 12, generator=g)

    got = add_low_rank(y.clone(), x, A, B, 0.5)
    want = y + 0.5 * (x if A is None else x @ A.t()) @ B.t()
    wanted = [t for t in leaves if t.requires_grad]

    assert type(got.grad_fn).__name__ == "LowRankAddBackward"  # one node, not baddbmm's bmm + expand-sum
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, wanted, out_grad), torch.autograd.grad(want, wanted, out_grad)):
        torch.testing.assert_close(a, b)


def test_low_rank_add_without_gradients_writes_into_y():
    y, x, A, B = torch.randn(2, 5, 12), torch.randn(2, 5, 9), torch.randn(8, 9), torch.randn(12, 8)
    want = y + 0.5 * x @ A.t() @ B.t()
    out = add_low_rank(y, x, A, B, 0.5)
    assert out.data_ptr() == y.data_ptr() and out.grad_fn is None
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("hybrid_r", [0, 2])
@pytest.mark.parametrize("k", [2, 4])
def test_gralora_as_one_lora_matches_the_dense_update(k, hybrid_r):
    """The forward runs GraLoRA as one LoRA of rank k r + hybrid_r (block-diagonal factors, rows exchanged):
    outputs and gradients equal the dense block update for every k, with and without the hybrid pair."""
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for("gralora", k=k, hybrid_r=hybrid_r))
    with torch.no_grad():
        for t in tiny.lora_tensors(model).values():
            t.add_(0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(6)))
    layer = model.layers[0].down_proj  # 64 -> 32
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    got = layer(x)
    want = F.linear(x, layer.weight, layer.bias) + x @ layer.lora_variant.delta_weight(layer).t()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got.square().sum(), [x, *params]),
                    torch.autograd.grad(want.square().sum(), [x, *params])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_hooks_that_ran_first_keep_the_base_output(variant_name):
    model = adapted(variant_name)
    clean = model(tiny.tokens())
    layer = model.layers[0].q_proj
    seen = {}

    def keep(name):
        def hook(m, args, y):  # returns None: observes, replaces nothing
            if m is layer:
                seen[name] = (args[0], y)
        return hook

    handles = [layer.register_forward_hook(keep("prepended"), prepend=True),
               torch.nn.modules.module.register_module_forward_hook(keep("global"))]
    try:
        out = model(tiny.tokens())
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, clean, atol=0, rtol=0)
    for name, (x, y) in seen.items():
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=1e-6, rtol=1e-6, msg=name)


def test_a_hook_registered_before_attach_keeps_the_base_output():
    model = tiny.TinyLM()
    layer = model.layers[0].v_proj
    seen = []
    layer.register_forward_hook(lambda m, args, y: seen.append((args[0], y)))
    ll.attach(model, tiny.cfg_for("lora"))
    with torch.no_grad():
        layer.lora_B.fill_(0.5)
    model(tiny.tokens())
    x, y = seen[0]
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=1e-6, rtol=1e-6)
