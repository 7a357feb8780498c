"""Bugs the library we grow from shipped (STYLE.md, practice 9), one test each."""
from dataclasses import dataclass

import pytest
import tiny
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import PCAConfig, calibration, perturb, registered
from torch import nn

import lora_lite as ll
from lora_lite.variant import ParamSpec, zeros
from lora_lite.variants.lora import LoRA, LoRAConfig
from lora_lite.weights import dense_weight


def test_attach_twice_raises_and_first_adapter_keeps_working(tmp_path):
    model, ids = tiny.TinyLM(), tiny.tokens()
    ll.attach(model, ll.LoRAConfig(r=4))
    perturb(model)
    want, tensors = model(ids), dict(tiny.lora_tensors(model))
    ll.save(model, tmp_path / "a.safetensors")
    for again in (lambda: ll.attach(model, ll.LoRAConfig(r=4)),
                  lambda: ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"q_proj",))),
                  lambda: ll.load(model, tmp_path / "a.safetensors")):
        with pytest.raises(ValueError, match="already attached.*ll.detach"):
            again()
    now = tiny.lora_tensors(model)
    assert now.keys() == tensors.keys() and all(now[k] is tensors[k] or torch.equal(now[k], tensors[k]) for k in now)
    assert all(len(m._forward_hooks) == 1 for _, m in ll.adapted_layers(model))
    assert torch.equal(model(ids), want)


@dataclass
class SVDConfig(LoRAConfig):
    pass


class SVD(ll.Variant):
    """LoRA whose A starts as the top-r right-singular vectors of W: an init that reads the base weight."""

    name = "test_svd"
    config = SVDConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), None), "lora_B": ParamSpec((d_out, cfg.r), zeros)}

    @staticmethod
    def init(layer, cfg):
        layer.lora_A.copy_(torch.linalg.svd(dense_weight(layer), full_matrices=False).Vh[:cfg.r])

    forward = LoRA.forward
    delta_weight = LoRA.delta_weight


@pytest.fixture
def svd():
    with registered(SVD):
        yield SVD


def test_detach_after_weight_reading_variant_is_bit_exact(svd):
    readers = ["test_svd"] + sorted(n for n, v in ll.REGISTRY.items() if v.init is not ll.Variant.init and n != "test_svd")
    ids = tiny.tokens()
    for name in readers:
        model = tiny.TinyLM()
        state, base = {k: v.clone() for k, v in model.state_dict().items()}, model(ids)
        ll.attach(model, tiny.cfg_for(name))
        if name == "test_svd":
            Vh = torch.linalg.svd(model.layers[0].q_proj.weight.detach(), full_matrices=False).Vh
            assert torch.allclose(model.layers[0].q_proj.lora_A, Vh[:4], atol=1e-6)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            tiny.lm_loss(model, ids).backward()
            opt.step()
        ll.detach(model)
        now = model.state_dict()
        assert now.keys() == state.keys(), name
        assert all(torch.equal(now[k], state[k]) for k in state), name
        assert torch.equal(model(ids), base), name


def test_reload_after_group_init_needs_no_calibration_data(pca, tmp_path):
    model, ids = tiny.TinyLM(), tiny.tokens()
    ll.attach(model, PCAConfig(r=4), calibration_data=calibration())
    perturb(model)
    want, saved = model(ids), {k: v.clone() for k, v in tiny.lora_tensors(model).items()}
    ll.save(model, tmp_path / "a.safetensors")
    fresh = tiny.TinyLM()
    ll.load(fresh, tmp_path / "a.safetensors")  # the seed re-ran init here; PCA would raise without data
    loaded = tiny.lora_tensors(fresh)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert torch.equal(fresh(ids), want)


def bare_blocks():
    """Root names are `layers.N.*`; no config, no embedding, and the MLP (64) is wider than d_model (32)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList(tiny.Block(32, 64) for _ in range(2))
    return model


def test_roles_without_hidden_size():
    with ll.attached(bare_blocks(), ll.LoRAConfig(r=2, target_roles=())) as handle:
        roles = {t.name.split(".")[-1]: t.role for t in handle.targets}
    assert roles == {"q_proj": "reader", "k_proj": "reader", "v_proj": "reader", "gate_proj": "reader",
                     "up_proj": "reader", "o_proj": "writer", "down_proj": "writer"}


def test_layers_index_at_the_root():
    with ll.attached(bare_blocks(), ll.LoRAConfig(r=2, layers=(0,))) as handle:
        names = [t.name for t in handle.targets]
    assert len(names) == 7 and all(n.startswith("layers.0.") for n in names)


def test_typo_in_one_of_two_patterns_raises_naming_it():
    model = tiny.TinyLM()
    with pytest.raises(ValueError, match=r"pattern 'v_prj' matches no"):
        ll.attach(model, ll.LoRAConfig(target_names=(r"q_proj", r"v_prj")))
    assert ll.adapted_layers(model) == []


def test_save_from_compiled_model_loads_onto_plain_one(tmp_path):
    model, ids = tiny.TinyLM(), tiny.tokens()
    ll.attach(model, ll.LoRAConfig(r=4))  # attach first, then compile (compile does not guard on hooks)
    perturb(model)
    compiled = torch.compile(model, backend="eager")
    assert torch.allclose(compiled(ids), model(ids), atol=1e-6)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    ll.save(compiled, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert tensors and not any("_orig_mod" in k for k in tensors) and "layers.0.q_proj.lora_A" in tensors
    plain = tiny.TinyLM()
    ll.load(plain, tmp_path / "a.safetensors")
    assert torch.equal(plain(ids), model(ids))
    # a file written by a tool that kept the prefix loads too
    save_file({f"_orig_mod.{k}": v for k, v in tensors.items()}, str(tmp_path / "b.safetensors"), metadata=metadata)
    ll.detach(plain)
    ll.load(plain, tmp_path / "b.safetensors")
    assert torch.equal(plain(ids), model(ids))


def test_a_bare_linear_as_the_model_detaches_exactly():
    """The root itself is the adapted layer: its lora_* scratch attributes and the runtime's own record of
    requires_grad share one __dict__, and detach must still restore the flags."""
    layer = nn.Linear(8, 8)
    layer.bias.requires_grad_(False)
    x = torch.randn(2, 8)
    before = layer(x)
    ll.attach(layer, LoRAConfig(r=2, target_roles=()))
    assert not layer.weight.requires_grad
    ll.detach(layer)
    assert layer.weight.requires_grad and not layer.bias.requires_grad
    assert torch.equal(layer(x), before) and not [k for k in layer.__dict__ if k.startswith("lora_")]
