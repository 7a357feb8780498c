"""Property tests: the contract on random layer shapes, ranks and variants (hypothesis, bounded).

Each example is a chain of one or two nn.Linear layers with random widths (1..24) and a valid
config for a random registered variant: GraLoRA gets widths and r that its k divides, PiSSA an
r no larger than any layer. Three properties: identity at t=0, save/load exact, merge == forward.
"""
import os
import tempfile

import tiny
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lora_lite as ll

SETTINGS = settings(max_examples=40, deadline=None, database=None)


@st.composite
def cases(draw, at_t0=False):
    """(variant name, layer widths d0->d1(->d2), config kwargs) that the variant accepts.

    `at_t0`: no SingLoRA ramp_up_steps=0, which by definition means u = 1 from the start (no identity)."""
    name = draw(st.sampled_from(sorted(ll.REGISTRY)))
    n_layers = draw(st.integers(1, 2))
    kw = {}
    if name == "gralora":
        k = draw(st.integers(1, 4))
        dims = [k * draw(st.integers(1, 24 // k)) for _ in range(n_layers + 1)]
        kw = {"k": k, "r": k * draw(st.integers(1, 3)), "hybrid_r": draw(st.integers(0, 2))}
    else:
        dims = [draw(st.integers(1, 24)) for _ in range(n_layers + 1)]
        kw = {"r": draw(st.integers(1, min(dims) if name == "pissa" else 8))}
    if name == "pissa":
        kw["niter"] = draw(st.sampled_from([None, 2]))
    if name == "singlora":
        kw["ramp_up_steps"] = draw(st.sampled_from([1, 10] if at_t0 else [0, 1, 10]))
    if "use_rslora" in ll.REGISTRY[name].config.__dataclass_fields__:
        kw["use_rslora"] = draw(st.booleans())
    return name, dims, kw


def build(dims, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims, dims[1:])]).eval()


def config(name, kw):
    return tiny.cfg_for(name, alpha=2.0 * kw["r"], target_roles=(), **kw)  # target_roles=(): every layer


def inputs(dims, seed):
    return torch.randn(3, 2, dims[0], generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(cases(at_t0=True), st.integers(0, 2**16))
def test_identity_at_t0(case, seed):
    name, dims, kw = case
    model, x = build(dims, seed), inputs(dims, seed)
    y0 = model(x)
    ll.attach(model, config(name, kw))
    y1 = model(x)
    assert (y1 - y0).abs().max() <= 1e-6 * max(1.0, y0.abs().max().item())


@SETTINGS
@given(cases(), st.integers(0, 2**16))
def test_save_load_exact(case, seed):
    name, dims, kw = case
    model, x = build(dims, seed), inputs(dims, seed)
    base = model(x)
    ll.attach(model, config(name, kw))
    tiny.perturb(model, seed, scale=0.3)
    y, saved = model(x), tiny.lora_tensors(model)
    assert not torch.equal(y, base)  # the perturbed adapter is live
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "a.safetensors")
        ll.save(model, path)
        ll.detach(model)
        assert torch.equal(model(x), base)
        fresh = build(dims, seed)
        ll.load(fresh, path)
    loaded = tiny.lora_tensors(fresh)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert torch.equal(fresh(x), y)


@SETTINGS
@given(cases(), st.integers(0, 2**16))
def test_merge_equals_forward(case, seed):
    name, dims, kw = case
    model, x = build(dims, seed), inputs(dims, seed)
    ll.attach(model, config(name, kw))
    tiny.perturb(model, seed, scale=0.3)
    with torch.no_grad():
        y = model(x)
        ll.merge(model)
        assert ll.adapted_layers(model) == []
        merged = model(x)
    assert (merged - y).norm() <= 1e-5 * y.norm().clamp_min(1.0)
