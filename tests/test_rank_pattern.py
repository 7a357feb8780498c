"""rank_pattern / alpha_pattern: PEFT's rule for which key applies, per-layer shapes and scales, checked per
layer, recorded in the file by exact module path."""
import json

import pytest
import tiny
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key

import lora_lite as ll
from lora_lite.config import pattern_key

IDS = tiny.tokens(vocab=tiny.VOCAB)


def llama():
    torch.manual_seed(0)  # the same base every call: a reload goes onto a fresh copy
    return tiny.llama()
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj",
         "model.layers.10.self_attn.v_proj", "encoder.q"]
KEYS = [["q_proj"], ["layers.1.self_attn.q_proj", "q_proj"], [r"layers\.1\d*\..*"], ["down_proj", "proj"], ["q"],
        ["self_attn.q"], [r".*\.(q|v)_proj"]]


@pytest.mark.parametrize("keys", KEYS)
def test_the_key_chosen_is_peft_s(keys):
    for name in NAMES:
        assert (pattern_key(keys, name) or name) == get_pattern_key(keys, name)


PATTERNS = {"rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 8}, "alpha_pattern": {"v_proj": 3.0}}


@pytest.mark.parametrize("name", sorted(ll.REGISTRY))
def test_every_variant_uses_and_reloads_per_layer_ranks(name, tmp_path):
    model = llama()
    cfg = tiny.cfg_for(name, **PATTERNS)
    ll.attach(model, cfg)
    ranks = {n: (layer.lora_config.r, layer.lora_config.alpha) for n, layer in ll.adapted_layers(model)}
    assert ranks["model.layers.0.self_attn.q_proj"] == (2, cfg.alpha)
    assert ranks["model.layers.1.mlp.down_proj"] == (8, cfg.alpha)
    assert ranks["model.layers.0.self_attn.v_proj"] == (4, 3.0)
    assert ranks["model.layers.0.mlp.down_proj"] == (4, cfg.alpha)
    tiny.perturb(model)
    want = tiny.logits(model, IDS).detach()
    ll.save(model, tmp_path / "a.safetensors")
    saved = json.loads(tiny.raw(tmp_path / "a.safetensors")[1]["config"])
    assert saved["rank_pattern"]["model.layers.1.self_attn.q_proj"] == 2  # exact paths, no pattern
    fresh = llama()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert {n: (la.lora_config.r, la.lora_config.alpha) for n, la in ll.adapted_layers(fresh)} == ranks
    assert torch.equal(tiny.logits(fresh, IDS), want)
    rows = [line.split() for line in ll.summary(fresh).splitlines()]
    assert ["model.layers.*.self_attn.q_proj", "×2", "reader", "32->32", name, "2"] == rows[1][:6]
    assert ["model.layers.1.mlp.down_proj", "writer", "64->32", name, "8"] in [r[:5] for r in rows]


def test_ranks_and_scales_equal_peft_s():
    patterns = {"rank_pattern": {"q_proj": 2, r"layers\.1\..*down_proj": 8}, "alpha_pattern": {"v_proj": 3}}
    ours, theirs = llama(), llama()
    ll.attach(ours, ll.LoRAConfig(r=4, alpha=8, target_names=("q_proj", "v_proj", "down_proj"), **patterns))
    peft = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             **patterns))
    for name, layer in ll.adapted_layers(ours):
        ref = peft.base_model.model.get_submodule(name)
        assert (layer.lora_A.shape[0], layer.lora_config.scale()) == (ref.r["default"], ref.scaling["default"]), name


@pytest.mark.parametrize("cfg, match", [
    (tiny.cfg_for("gralora", rank_pattern={"q_proj": 3}), r"model.layers.0.self_attn.q_proj"),
    (tiny.cfg_for("pissa", rank_pattern={"k_proj": 20}), r"model.layers.0.self_attn.k_proj"),
    (tiny.cfg_for("lora", rank_pattern={"q_prj": 2}), "match no adapted layer"),
    (tiny.cfg_for("lora", alpha_pattern={"q_proj": 4}, rank_pattern={"k_proj": 2, "v_prj": 1}), "v_prj"),
])
def test_bad_per_layer_values_name_the_layer(cfg, match):
    model = llama()
    tiny.refused(model, ValueError, match, ll.attach, model, cfg)


@pytest.mark.parametrize("pattern", [{"q_proj": 0}, {"q_proj": 2.5}, {"": 2}, {"(": 2}])
def test_bad_patterns_are_refused_at_config(pattern):
    with pytest.raises((ValueError, TypeError)):
        ll.LoRAConfig(rank_pattern=pattern)


def test_a_file_pattern_is_never_run_as_a_regex(tmp_path):
    model = llama()
    ll.attach(model, tiny.cfg_for("lora", rank_pattern={"q_proj": 2}))
    ll.save(model, tmp_path / "a.safetensors")
    bad = tiny.rewrite(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                       edit_config=lambda c: c.update(rank_pattern={r"(a+)+$": 2}))
    fresh = llama()
    tiny.refused(fresh, ValueError, "never run as regexes", ll.load, fresh, bad)


@pytest.mark.parametrize("name, form", [("lora", "native"), ("lora", "lora"), ("pissa", "native"),
                                        ("gralora", "native"), ("singlora", "lora")])
def test_per_module_ranks_travel_through_peft(name, form, tmp_path):
    model = llama()
    ll.attach(model, tiny.cfg_for(name, **PATTERNS))
    tiny.perturb(model)
    want = tiny.logits(model, IDS).detach()
    ll.export_peft(model, tmp_path / "peft", form=form)
    d = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert d["peft_type"] == "LORA" and d["rank_pattern"]  # per-module r: PEFT's LoRA, by exact path
    theirs = PeftModel.from_pretrained(llama(), tmp_path / "peft")
    with torch.no_grad():
        got = theirs(IDS).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    fresh = llama()
    ll.load(fresh, tmp_path / "peft")
    assert torch.allclose(tiny.logits(fresh, IDS), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    ranks = {n: la.lora_A.shape[0] for n, la in ll.adapted_layers(fresh)}
    assert ranks["model.layers.0.self_attn.q_proj"] * 2 == ranks["model.layers.0.self_attn.k_proj"]  # r 2 vs 4
