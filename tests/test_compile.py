"""torch.compile on a hooked model: no graph breaks from our hooks, same numbers as eager, and the order rule.

The numeric check compiles with backend="aot_eager": dynamo's capture of the hooks plus AOTAutograd's
forward and backward graphs, which is where a hook could go wrong (a graph break, a Python branch on a
tensor value, an in-place op autograd rejects). Inductor's C++ codegen on top costs 20-60 s per variant
on 2 CPU cores, too slow for the unit suite: `LL_COMPILE_BACKEND=inductor python -m pytest
tests/test_compile.py -k matches_eager` runs the same check through inductor.
"""
import copy
import os

import pytest
import tiny
import torch
from tiny import assert_restored, perturb, snapshot

import lora_lite as ll

BACKEND = os.environ.get("LL_COMPILE_BACKEND", "aot_eager")


def small(name):
    model = tiny.TinyLM(d=16, f=32, n_layers=1)
    ll.attach(model, tiny.cfg_for(name))
    perturb(model)
    return model


def test_no_graph_breaks(variant_name):
    torch._dynamo.reset()
    model = small(variant_name)
    explained = torch._dynamo.explain(model)(tiny.tokens(2, 8))
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_matches_eager_forward_and_backward():
    """All variants in one test: one dynamo warm-up, a 1-layer model each."""
    ids = tiny.tokens(2, 8)
    for name in sorted(ll.REGISTRY):
        torch._dynamo.reset()
        eager = small(name)
        compiled = torch.compile(copy.deepcopy(eager), backend=BACKEND, fullgraph=True)
        losses = [tiny.lm_loss(m, ids) for m in (eager, compiled)]
        assert torch.allclose(losses[0], losses[1], atol=1e-5), name
        for loss in losses:
            loss.backward()
        ref = {k: p.grad for k, p in eager.named_parameters() if p.requires_grad}
        got = {k.removeprefix("_orig_mod."): p.grad for k, p in compiled.named_parameters() if p.requires_grad}
        assert ref.keys() == got.keys() and ref, name
        for key, g in ref.items():
            assert got[key] is not None and torch.allclose(g, got[key], atol=1e-5), f"{name} {key}"


def test_attach_or_load_after_compile_is_refused(tmp_path):
    torch._dynamo.reset()
    model = tiny.TinyLM()
    donor = copy.deepcopy(model)
    ll.attach(donor, tiny.cfg_for("lora"))
    ll.save(donor, tmp_path / "a.safetensors")
    compiled = torch.compile(model, backend="eager")
    compiled(tiny.tokens())
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"torch\.compile.*attach \(or load\) the adapter first"):
        ll.attach(compiled, tiny.cfg_for("lora"))
    with pytest.raises(ValueError, match=r"torch\.compile.*attach \(or load\) the adapter first"):
        ll.load(compiled, tmp_path / "a.safetensors")
    assert_restored(model, snap)
    model.compile(backend="eager")  # the in-place form
    with pytest.raises(ValueError, match="torch.compile"):
        ll.attach(model, tiny.cfg_for("lora"))
    assert_restored(model, snap)


def test_save_and_detach_through_compiled_wrapper(tmp_path):
    """Attach, compile and train, then save / detach on the compiled wrapper: canonical keys, exact base."""
    torch._dynamo.reset()
    model = tiny.TinyLM(d=16, f=32, n_layers=1)
    snap = snapshot(model)
    ids = tiny.tokens(2, 8)
    base_out = model(ids)
    ll.attach(model, tiny.cfg_for("lora"))
    perturb(model)
    compiled = torch.compile(model, backend="eager")
    out = compiled(ids)
    ll.save(compiled, tmp_path / "a.safetensors")
    _, _, tensors = ll.read(tmp_path / "a.safetensors")
    assert not any("_orig_mod" in k for k in tensors)
    fresh = tiny.TinyLM(d=16, f=32, n_layers=1)
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.allclose(fresh(ids), out, atol=1e-6)
    ll.detach(compiled)
    assert_restored(model, snap)
    assert torch.equal(compiled(ids), base_out)  # dynamo re-traces: the removed parameters fail its guards
