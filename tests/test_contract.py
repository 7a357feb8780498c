"""The cross-variant contract (VARIANTS.md, end): every registered variant passes every test here.

Tests take the `variant_name` fixture, so a newly registered variant inherits the whole suite.
Point 9 (numeric parity with the reference implementation) lives in the per-variant files.
"""
import copy

import pytest
import tiny
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import assert_restored, perturb, snapshot

import lora_lite as ll


def train(model, ids, steps, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ll.track_steps(opt, model)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = tiny.lm_loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def model():
    return tiny.TinyLM()


@pytest.fixture
def ids():
    return tiny.tokens()


def test_identity_at_init(variant_name, model, ids):
    base = model(ids)
    ll.attach(model, tiny.cfg_for(variant_name))
    out = model(ids)
    assert out.dtype == base.dtype
    assert (out - base).abs().max() <= 1e-6 * base.abs().max()


def test_hooks_live(variant_name, model, ids):
    handle = ll.attach(model, tiny.cfg_for(variant_name))
    ll.set_step(model, 10**6)
    before = model(ids)
    perturb(model)
    after = model(ids)
    assert not torch.allclose(after, before, atol=1e-4)
    # every target contributes: perturbing one layer's tensors alone changes the output
    for t in handle.targets:
        with torch.no_grad():
            for v in tiny.lora_tensors(t.layer).values():
                if v.is_floating_point():
                    v.add_(0.1 * torch.randn(v.shape))
        assert not torch.equal(model(ids), after), f"{t.name} has no effect"
        after = model(ids)


def test_save_detach_load_is_exact(variant_name, model, ids, tmp_path):
    base = model(ids)
    cfg = tiny.cfg_for(variant_name)
    ll.attach(model, cfg)
    perturb(model)
    hooked = model(ids)
    path = tmp_path / "adapter.safetensors"
    ll.save(model, path)

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(tiny.lora_tensors(model))
    modules = dict(model.named_modules())
    for key in keys:
        module, tensor = key.rsplit(".", 1)
        assert module in modules and tensor.startswith("lora_"), key
    assert any(k.startswith("layers.0.q_proj.lora_") for k in keys)

    ll.detach(model)
    assert torch.equal(model(ids), base)
    handle = ll.load(model, path)
    assert handle.config == cfg
    assert torch.equal(model(ids), hooked)

    fresh = tiny.TinyLM()
    ll.load(fresh, path)
    assert torch.equal(fresh(ids), hooked)


def _alter(tensors, how):
    """A copy of the file's tensors with one key missing, one extra, or one mis-shaped; returns (tensors, key)."""
    tensors = dict(tensors)
    key = next(k for k in sorted(tensors) if tensors[k].ndim >= 1)
    if how == "missing":
        del tensors[key]
    elif how == "unexpected":
        key = "layers.0.q_proj.lora_extra"
        tensors[key] = torch.zeros(3)
    else:
        shape = list(tensors[key].shape)
        shape[0] += 1
        tensors[key] = torch.zeros(shape, dtype=tensors[key].dtype)
    return tensors, key


@pytest.mark.parametrize("how", ["missing", "unexpected", "wrong_shape"])
def test_bad_file_fails_loudly_and_leaves_model_alone(variant_name, model, ids, tmp_path, how):
    ll.attach(model, tiny.cfg_for(variant_name))
    perturb(model)
    good = tmp_path / "good.safetensors"
    ll.save(model, good)
    ll.detach(model)
    with safe_open(str(good), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors, key = _alter(tensors, how)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)

    model.embed_tokens.weight.requires_grad_(False)
    snap, base = snapshot(model), model(ids)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        ll.load(model, bad)
    assert how.replace("_", " ") in str(err.value)
    assert_restored(model, snap)
    assert torch.equal(model(ids), base)


def test_only_adapter_trains(variant_name, model, ids):
    ll.attach(model, tiny.cfg_for(variant_name))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in trainable)
    ll.set_step(model, 10**6)
    tiny.lm_loss(model, ids).backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in with_grad)


def test_training_lowers_loss(variant_name, model, ids):
    ll.attach(model, tiny.cfg_for(variant_name))
    losses = train(model, ids, steps=25)
    assert losses[-1] < 0.95 * losses[0], losses
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n


def test_detach_restores_base_bit_for_bit(variant_name, model, ids):
    model.layers[1].up_proj.weight.requires_grad_(False)  # frozen by the user: must stay frozen
    snap, base = snapshot(model), model(ids)
    ll.attach(model, tiny.cfg_for(variant_name))
    train(model, ids, steps=3)
    ll.detach(model)
    assert_restored(model, snap)
    assert torch.equal(model(ids), base)
    ll.detach(model)  # nothing attached: a no-op
    assert_restored(model, snap)


def test_merge_equals_hooked_output(variant_name, model, ids):
    base = model(ids)
    ll.attach(model, tiny.cfg_for(variant_name))
    train(model, ids, steps=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in ll.adapted_layers(model):
            d_out, d_in = layer.weight.shape
            x, y = torch.randn(5, d_in, generator=g), torch.randn(5, d_out, generator=g)
            got = layer.lora_variant.forward(layer, x, y.clone()) - y  # forward may write into y
            want = x @ layer.lora_variant.delta_weight(layer).t()
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), name
        hooked = model(ids)
    ll.merge(model)
    merged = model(ids)
    # 1e-5 of the output's scale: DeLoRA's first steps grow outputs to ~16, where fp32 rounding alone is ~1e-6
    assert (merged - hooked).abs().max() <= 1e-5 * max(1.0, hooked.abs().max().item())
    assert not torch.allclose(merged, base, atol=1e-4)
    assert_restored(model, snapshot(model))  # no adapter, hook or attribute left


def test_attached_context_detaches_on_exit_and_error(variant_name, model, ids):
    snap, base = snapshot(model), model(ids)
    with ll.attached(model, tiny.cfg_for(variant_name)) as handle:
        assert ll.adapted_layers(model) and handle.targets
        perturb(model)
        assert not torch.equal(model(ids), base)
    assert_restored(model, snap)
    with pytest.raises(RuntimeError, match="boom"):
        with ll.attached(model, tiny.cfg_for(variant_name)):
            raise RuntimeError("boom")
    assert_restored(model, snap)


def test_deepcopy_is_independent(variant_name, model, ids):
    base = model(ids)
    ll.attach(model, tiny.cfg_for(variant_name))
    perturb(model)
    hooked = model(ids)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(ids), hooked)
    name, p = next((n, p) for n, p in twin.named_parameters() if p.requires_grad)
    with torch.no_grad():
        p.add_(1.0)
    assert not torch.equal(twin(ids), hooked), name
    assert torch.equal(model(ids), hooked)
    ll.detach(twin)
    assert torch.equal(twin(ids), base)
    assert torch.equal(model(ids), hooked)


def test_summary_lists_every_target(variant_name, model):
    handle = ll.attach(model, tiny.cfg_for(variant_name))
    text = ll.summary(model, verbose=True)
    lines = text.splitlines()
    for t in handle.targets:
        row = next(line for line in lines if line.split()[0] == t.name)
        assert row.split()[1:5] == [t.role, f"{t.d_in}->{t.d_out}", variant_name, "4"], row
    total = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert f"{len(handle.targets)} layers adapted" in text and f"trainable params: {total:,} ||" in text
