"""Targeting: which layers a config selects, and the role (reader / writer / inner) of each."""
import re
from types import SimpleNamespace

import pytest
import tiny
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import lora_lite as ll

LLAMA_ROLES = {"q_proj": "reader", "k_proj": "reader", "v_proj": "reader", "gate_proj": "reader",
               "up_proj": "reader", "o_proj": "writer", "down_proj": "writer"}


def targets(model, **kw):
    """{module name: role} of what `kw` selects (attached, then detached again)."""
    with ll.attached(model, ll.LoRAConfig(r=2, **kw)) as handle:
        return {t.name: t.role for t in handle.targets}


class Funnel(nn.Module):
    """No embedding, and the inner width (48) is the most common one: only config.hidden_size tells d_model."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=16)
        self.in_proj = nn.Linear(16, 48)
        self.mix = nn.ModuleList(nn.Linear(48, 48) for _ in range(3))
        self.out_proj = nn.Linear(48, 16)


@pytest.mark.parametrize("with_config", [False, True])
def test_llama_roles_with_and_without_hidden_size(with_config):
    model = tiny.TinyLM()
    if with_config:
        model.config = SimpleNamespace(hidden_size=32)
    want = {f"layers.{i}.{leaf}": role for i in range(2) for leaf, role in LLAMA_ROLES.items()}
    assert targets(model) == want


def test_config_hidden_size_decides_d_model():
    assert targets(Funnel(), target_roles=()) == {
        "in_proj": "reader", "mix.0": "inner", "mix.1": "inner", "mix.2": "inner", "out_proj": "writer"}
    assert set(targets(Funnel(), target_roles=("inner",))) == {"mix.0", "mix.1", "mix.2"}


def test_unresolvable_square_layer_errors_only_when_roles_need_it():
    model = tiny.TinyLM()
    model.layers[0].mix = nn.Linear(32, 32)  # square, and its name says nothing
    assert targets(model)["layers.0.mix"] is None  # default roles take readers and writers alike
    assert "layers.0.mix" in targets(model, target_roles=())
    for roles in [("reader",), ("writer",)]:
        with pytest.raises(ValueError, match=r"layers\.0\.mix") as err:
            ll.attach(model, ll.LoRAConfig(target_roles=roles))
        assert "target_names" in str(err.value)  # says what to do
        assert ll.adapted_layers(model) == []
    picked = targets(model, target_roles=(), target_names=(r"\.mix$",))
    assert picked == {"layers.0.mix": None}


def test_target_names_exclude_names_layers_roles():
    model = tiny.TinyLM()
    assert set(targets(model, target_names=("q_proj", r"\.down"))) == {  # a plain name, a regex
        "layers.0.q_proj", "layers.1.q_proj", "layers.0.down_proj", "layers.1.down_proj"}
    assert set(targets(model, target_roles=("writer",))) == {
        "layers.0.o_proj", "layers.1.o_proj", "layers.0.down_proj", "layers.1.down_proj"}
    assert set(targets(model, layers=(1,))) == {f"layers.1.{leaf}" for leaf in LLAMA_ROLES}
    # exclude_names adds to the default exclusions: lm_head (a 32->48 reader) stays out
    picked = targets(model, exclude_names=("k_proj",))
    assert set(picked) == {f"layers.{i}.{leaf}" for i in range(2) for leaf in LLAMA_ROLES if leaf != "k_proj"}
    assert "lm_head" not in targets(model)
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist.*\[0, 1\]"):
        ll.attach(model, ll.LoRAConfig(layers=(5,)))


def test_nothing_matched_lists_candidates_and_roles():
    model = tiny.TinyLM()
    with pytest.raises(ValueError, match="selected no module") as err:
        ll.attach(model, ll.LoRAConfig(target_roles=("inner",)))
    for line in ["layers.0.q_proj (reader 32->32)", "layers.1.o_proj (writer 32->32)",
                 "layers.0.up_proj (reader 32->64)", "layers.0.down_proj (writer 64->32)"]:
        assert line in str(err.value)
    assert ll.adapted_layers(model) == []


def test_gpt2_conv1d_roles_and_layers():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    roles = {"attn.c_attn": ("reader", 32, 96), "attn.c_proj": ("writer", 32, 32),
             "mlp.c_fc": ("reader", 32, 128), "mlp.c_proj": ("writer", 128, 32)}
    with ll.attached(model, ll.LoRAConfig(r=2, layers=(1,))) as handle:
        got = {t.name: (t.role, t.d_in, t.d_out) for t in handle.targets}
    assert got == {f"transformer.h.1.{k}": v for k, v in roles.items()}


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=8)
        self.c_fc = layer

    def forward(self, x):
        return self.c_fc(x)


def test_conv1d_adapter_equals_linear_adapter(variant_name):
    torch.manual_seed(0)
    conv = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs; weight stored (d_in, d_out)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    lin = nn.Linear(8, 12)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    a, b = Holder(conv), Holder(lin)
    x = torch.randn(3, 5, 8)
    base = lin(x)
    cfg = tiny.cfg_for(variant_name)
    torch.manual_seed(1)
    (t,) = ll.attach(a, cfg).targets
    assert (t.role, t.d_in, t.d_out) == ("reader", 8, 12)
    torch.manual_seed(1)
    ll.attach(b, cfg)
    ta, tb = tiny.lora_tensors(a), tiny.lora_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:  # init that reads W must read the Conv1D weight transposed
        assert torch.allclose(ta[k], tb[k], atol=1e-6), k
    with torch.no_grad():
        for k in ta:
            if ta[k].is_floating_point():
                ta[k].add_(0.1 * torch.randn(ta[k].shape))
            tb[k].copy_(ta[k])
    for m in (a, b):
        ll.set_step(m, 10**6)
    hooked = a(x)
    assert torch.allclose(hooked, b(x), atol=1e-5)
    assert not torch.allclose(hooked, base, atol=1e-3)
    ll.merge(a)
    assert conv.weight.shape == (8, 12)
    assert torch.allclose(a(x), hooked, atol=1e-5)


def test_gpt2_adapter_is_identity_then_live():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    ids = tiny.tokens(vocab=64)
    base = model(ids).logits
    ll.attach(model, ll.LoRAConfig(r=2))
    assert torch.equal(model(ids).logits, base)
    with torch.no_grad():
        for k, v in tiny.lora_tensors(model).items():
            v.add_(0.1)
    assert not torch.allclose(model(ids).logits, base, atol=1e-4)
    names = [n for n, _ in ll.adapted_layers(model)]
    assert len(names) == 8 and all(re.search(r"\.(c_attn|c_proj|c_fc)$", n) for n in names)


def test_tied_output_head_is_left_out_unless_named():
    """An output head sharing the input embedding's weight (BERT's decoder, tied LM heads) is not a default
    target: adapting it by accident would train and, on merge, rewrite the embedding's twin."""
    model = tiny.TinyLM()
    model.lm_head.weight = model.embed_tokens.weight
    names = targets(model, exclude_names=())
    assert "lm_head" not in names and "layers.0.q_proj" in names
    assert list(targets(model, exclude_names=(), target_names=(r"lm_head",))) == ["lm_head"]


def test_merge_refuses_a_tied_weight():
    model = tiny.TinyLM()
    model.lm_head.weight = model.embed_tokens.weight
    ll.attach(model, tiny.cfg_for("lora", exclude_names=(), target_names=(r"lm_head",)))
    with torch.no_grad():
        model.lm_head.lora_B.normal_()
    before = model.embed_tokens.weight.clone()
    with pytest.raises(ValueError, match=r"lm_head is tied to \['embed_tokens.weight'\]"):
        ll.merge(model)
    assert torch.equal(model.embed_tokens.weight, before) and ll.adapted_layers(model)
