"""PEFT adapter folders: every variant exports to PEFT 0.21 in both forms and PEFT's loader reproduces it;
adapters PEFT itself saves import exactly; what cannot be imported exactly is refused by name."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
import os
import sys

import pytest
import tiny
import torch
from peft import (DeloraConfig, GraloraConfig, IA3Config, LoraConfig, PeftModel, get_peft_model)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lora_lite as ll

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import peft_roundtrip  # noqa: E402
import realmodel as rm  # noqa: E402

TOL = 1e-5
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def bases():
    return {"llama": rm.tiny_llama(), "gpt2": rm.tiny_gpt2()}


@pytest.fixture(scope="module")
def ids():
    return rm.windows(rm.text_ids(), batch=2, seq=16)


def config_of(folder) -> dict:
    with open(os.path.join(folder, "adapter_config.json")) as f:
        return json.load(f)


def keys_of(folder) -> dict[str, tuple]:
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ---- export: PEFT loads what lora-lite writes ------------------------------------------------------------

NATIVE = {("llama", "delora"): "DELORA", ("llama", "gralora"): "GRALORA", ("gpt2", "gralora"): "GRALORA"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_variant_round_trips_through_peft(bases, ids, arch, variant_name, tmp_path):
    """2 steps into SingLoRA's 5-step ramp: the folded ramp is u = 0.4, not 1."""
    row = peft_roundtrip.roundtrip(bases[arch], variant_name, ids, steps=2, lr=1e-2, tmp=str(tmp_path))
    assert row["effect"] > 0.05  # training moved the outputs: the comparisons below are not vacuous
    assert row["native"][1] <= TOL and row["lora"][1] <= TOL and row["import"] <= TOL, row
    r_lora = {"pissa": 16, "gralora": 16}.get(variant_name, 8)  # rank 2r; k r (+ hybrid_r = 0)
    r_native = 16 if variant_name == "pissa" else 8
    assert row["native"][0] == f"{NATIVE.get((arch, variant_name), 'LORA')} r={r_native}"
    assert row["lora"][0] == f"LORA r={r_lora}"
    native, plain = config_of(tmp_path / f"{variant_name}-native"), config_of(tmp_path / f"{variant_name}-lora")
    assert row["same_targets"]  # PEFT adapted exactly our modules, in both forms (a module it added would be 0)
    assert plain["lora_alpha"] == plain["r"] and plain["use_rslora"] is False
    assert native.get("fan_in_fan_out", arch == "gpt2") == (arch == "gpt2")  # PEFT's flag for Conv1D


def test_lora_factors_give_delta_weight(variant_name):
    """The export's contract with each variant: s · B′ A′ is its delta_weight."""
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for(variant_name, **({"hybrid_r": 2} if variant_name == "gralora" else {})))
    tiny.perturb(model)
    ll.set_step(model, 3)  # mid-ramp for SingLoRA
    for _, layer in ll.adapted_layers(model):
        A, B, s = layer.lora_variant.lora_factors(layer)
        want = layer.lora_variant.delta_weight(layer)
        torch.testing.assert_close(s * B @ A, want, atol=1e-6 * want.abs().max().item(), rtol=0)


@dataclass
class BareConfig(ll.LoRAConfig):
    pass


class Bare(ll.Variant):
    """A variant with neither lora_factors nor delta_weight: no dense update to merge or export."""
    name, config = "test_bare", BareConfig
    param_specs, forward = ll.REGISTRY["lora"].param_specs, ll.REGISTRY["lora"].forward


def test_variant_without_lora_factors_is_neither_exported_nor_merged(tmp_path):
    model = tiny.TinyLM()
    with tiny.registered(Bare):
        ll.attach(model, BareConfig(r=2))
        with pytest.raises(TypeError, match="variant test_bare has no lora_factors: it cannot be exported"):
            ll.export_peft(model, tmp_path)
        with pytest.raises(TypeError, match=r"variant test_bare has no delta_weight \(nor lora_factors\)"):
            ll.merge(model)
    assert not os.listdir(tmp_path)


def test_pca_calibrated_variant_exports_through_its_lora_factors(pca, tmp_path):
    """A variant from outside the library exports (and merges) through lora_factors alone."""
    model, ids = tiny.TinyLM(), tiny.tokens()
    ll.attach(model, tiny.PCAConfig(r=2), calibration_data=tiny.calibration())
    tiny.perturb(model)
    ll.export_peft(model, tmp_path)
    ref = PeftModel.from_pretrained(tiny.TinyLM(), tmp_path)
    torch.testing.assert_close(ref(ids), model(ids), atol=1e-5, rtol=0)


def _peft_twin(base, peft_cfg, seed=0):
    """PEFT's model on a copy of `base`, every adapter tensor moved off its init (B = 0)."""
    ref = get_peft_model(copy.deepcopy(base), peft_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return ref.eval()


PEFT_CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA),
    "rslora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA, use_rslora=True, lora_dropout=0.1),
    "delora": lambda: DeloraConfig(r=4, delora_lambda=3, target_modules=LLAMA),
    "gralora": lambda: GraloraConfig(r=4, alpha=8, gralora_k=2, hybrid_r=2, target_modules=LLAMA),
    "regex": lambda: LoraConfig(r=4, target_modules=r".*\.layers\.1\..*(q|v)_proj"),
    "layers": lambda: LoraConfig(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                                 exclude_modules=["mlp.down_proj"]),
}


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_peft_made_adapter_imports_exactly(bases, ids, kind, tmp_path):
    ref = _peft_twin(bases["llama"], PEFT_CONFIGS[kind]())
    ref.save_pretrained(tmp_path)
    want = rm.logits(ref, ids)
    model = copy.deepcopy(bases["llama"])
    handle = ll.load(model, tmp_path)
    assert [t.name for t in handle.targets] == [n.removeprefix("base_model.model.") for n, m in ref.named_modules()
                                                if hasattr(m, "base_layer")]
    assert rel(rm.logits(model, ids), want) <= TOL
    assert rel(rm.logits(bases["llama"], ids), want) > 0.01  # the adapter does something
    ll.save(model, tmp_path / "ll.safetensors")  # and it is a lora-lite adapter from then on
    fresh = copy.deepcopy(bases["llama"])
    ll.load(fresh, tmp_path / "ll.safetensors")
    assert torch.equal(rm.logits(fresh, ids), rm.logits(model, ids))


def rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")
def test_peft_pissa_converted_to_lora_imports_exactly(bases, ids, tmp_path):
    """PEFT's PiSSA, converted by PEFT for the unmodified base (rank 2r), gives PEFT's PiSSA outputs here."""
    ref = get_peft_model(copy.deepcopy(bases["llama"]), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                   init_lora_weights="pissa"))
    ref.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial factors as a LoRA
    ref.save_pretrained(tmp_path / "init")
    ref.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    want = rm.logits(ref, ids)  # on PEFT's residual base W - s B0 A0
    ref.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model = copy.deepcopy(bases["llama"])
    assert ll.load(model, tmp_path / "lora").config.r == 8
    assert rel(rm.logits(model, ids), want) <= TOL


def test_gpt2_conv1d_adapter_from_peft(bases, ids, tmp_path):
    """PEFT's orientation on Conv1D (fan_in_fan_out): A is (r, d_in), B (d_out, r), as on nn.Linear."""
    ref = _peft_twin(bases["gpt2"], LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    ref.save_pretrained(tmp_path)
    model = copy.deepcopy(bases["gpt2"])
    ll.load(model, tmp_path / "adapter_model.safetensors")  # the weights file, its config beside it
    assert rel(rm.logits(model, ids), rm.logits(ref, ids)) <= TOL


@pytest.mark.parametrize("variant", ["lora", "delora", "gralora"])
def test_native_files_are_what_peft_writes(bases, variant, tmp_path):
    """Same keys, shapes and main config fields as PEFT's own save_pretrained of the same adapter."""
    peft_cfg = {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA),
                "delora": DeloraConfig(r=4, delora_lambda=2, target_modules=LLAMA),
                "gralora": GraloraConfig(r=4, alpha=8, gralora_k=2, hybrid_r=2, target_modules=LLAMA)}[variant]
    get_peft_model(copy.deepcopy(bases["llama"]), peft_cfg).save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(bases["llama"])
    ll.attach(model, tiny.cfg_for(variant, **({"hybrid_r": 2} if variant == "gralora" else {})))
    ll.export_peft(model, tmp_path / "ours")
    assert keys_of(tmp_path / "ours") == keys_of(tmp_path / "peft")
    ours, theirs = config_of(tmp_path / "ours"), config_of(tmp_path / "peft")
    for field in ("peft_type", "r", "lora_alpha", "alpha", "hybrid_r", "gralora_k", "bias", "use_rslora"):
        assert ours.get(field) == theirs.get(field), field
    assert set(ours) <= set(theirs)  # no field PEFT does not know


def test_exact_target_list_and_base_name(bases, tmp_path):
    """target_modules is the exact list; base_model_name_or_path is written when the model knows it."""
    model = copy.deepcopy(bases["llama"])
    model.name_or_path = "org/tiny-llama"
    handle = ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"layers\.0\.self_attn\.q_proj",)))
    ll.export_peft(model, tmp_path, form="lora")
    cfg = config_of(tmp_path)
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj"] == [t.name for t in handle.targets]
    assert cfg["base_model_name_or_path"] == "org/tiny-llama"
    assert set(keys_of(tmp_path)) == {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"}


class Nested(nn.Module):
    """`a.q` and `b.a.q`: PEFT's list entry "a.q" would match both, so the export writes a regex."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.ModuleDict({"q": nn.Linear(8, 8)})
        self.b = nn.ModuleDict({"a": nn.ModuleDict({"q": nn.Linear(8, 8)})})

    def forward(self, x):
        return self.b["a"]["q"](self.a["q"](x))


def test_suffix_clash_exports_an_anchored_regex(tmp_path):
    model = Nested()
    x = torch.randn(3, 8)
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"^a\.q$",), target_roles=()))
    tiny.perturb(model)
    ll.export_peft(model, tmp_path)
    assert isinstance(config_of(tmp_path)["target_modules"], str)
    ref = PeftModel.from_pretrained(Nested(), tmp_path)
    assert [n for n, m in ref.named_modules() if hasattr(m, "base_layer")] == ["base_model.model.a.q"]
    torch.testing.assert_close(ref(x), model(x), atol=1e-6, rtol=0)


def test_export_errors(bases, tmp_path):
    model = copy.deepcopy(bases["llama"])
    with pytest.raises(ValueError, match="nothing to export"):
        ll.export_peft(model, tmp_path)
    ll.attach(model, ll.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="form must be one of"):
        ll.export_peft(model, tmp_path, form="vllm")
    assert not os.listdir(tmp_path)


def test_bitsandbytes_base_exports_the_float_adapter(bases, tmp_path):
    """The same adapter on a 4-bit base writes the same folder: export reads only adapter tensors."""
    model = copy.deepcopy(bases["llama"])
    ll.attach(model, tiny.cfg_for("gralora", hybrid_r=2))
    tiny.perturb(model)
    ll.save(model, tmp_path / "a.safetensors")
    ll.export_peft(model, tmp_path / "float")
    quantized = tiny.quantize(copy.deepcopy(bases["llama"]), "nf4")
    ll.load(quantized, tmp_path / "a.safetensors")
    ll.export_peft(quantized, tmp_path / "bnb")
    assert config_of(tmp_path / "bnb") == config_of(tmp_path / "float")
    a, b = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("float", "bnb"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- import refusals: nothing approximate is loaded, the model is left as it was -------------------------

def _saved(base, folder, peft_cfg):
    get_peft_model(copy.deepcopy(base), peft_cfg).save_pretrained(folder)
    return folder


def _edit_config(folder, **fields):
    cfg = config_of(folder) | fields
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


def _edit_keys(folder, fn):
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(path)
    save_file(fn(tensors), path)


def _refused(base, folder, match, error=ValueError):
    model = copy.deepcopy(base)
    snap = tiny.snapshot(model)
    with pytest.raises(error, match=match):
        ll.load(model, folder)
    tiny.assert_restored(model, snap)


def test_dora_and_other_features_are_refused_by_field(bases, tmp_path):
    base = bases["llama"]
    _refused(base, _saved(base, tmp_path / "dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)),
             r"use_dora=True \(lora-lite has no DoRA\)")
    folder = _saved(base, tmp_path / "lora", LoraConfig(r=2, target_modules=["q_proj"]))
    for fields, match, *error in [({"rank_pattern": {r".*q_proj": 4}}, "are regexes"),
                          ({"alpha_pattern": {"q_pr.j": 4}}, "name no target module"), ({"bias": "all"}, "bias='all'"),
                          ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
                          ({"modules_to_save": ["lm_head"]}, "missing modules_to_save keys: lm_head.weight"),
                          ({"some_future_field": 3}, "some_future_field=3"),
                          ({"target_modules": None}, "target_modules is missing"),
                          ({"lora_bias": True}, "lora_bias=True"), ({"r": 0}, r"r must be an int in \[1, "),
                          ({"use_rslora": "yes"}, "use_rslora must be true or false", TypeError),
                          ({"lora_alpha": "8"}, "lora_alpha must be a number", TypeError),
                          ({"target_modules": "q_proj("}, "is not a valid regex"),
                          ({"layers_to_transform": "1"}, "layers_to_transform must be an int or a list", TypeError)]:
        original = config_of(folder)
        _edit_config(folder, **fields)
        _refused(base, folder, match, *error)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(original, f)
    ll.load(copy.deepcopy(base), folder)  # the restored folder itself loads


def test_unknown_peft_type_is_refused(bases, tmp_path):
    folder = _saved(bases["llama"], tmp_path, IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    _refused(bases["llama"], folder, r"peft_type 'IA3' cannot be imported")
    _edit_config(folder, peft_type=["LORA"])  # not even a string
    _refused(bases["llama"], folder, r"peft_type \['LORA'\] cannot be imported")


def test_all_linear_selects_what_peft_selects(bases, ids, tmp_path):
    """"all-linear" as PEFT reads it: every linear layer but the output head (saved configs hold the list)."""
    ref = _peft_twin(bases["llama"], LoraConfig(r=2, target_modules="all-linear"))
    ref.save_pretrained(tmp_path)
    _edit_config(tmp_path, target_modules="all-linear")
    theirs = PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), tmp_path).eval()
    model = copy.deepcopy(bases["llama"])
    handle = ll.load(model, tmp_path)
    assert len(handle.targets) == 14 and "lm_head" not in {t.name for t in handle.targets}
    assert rel(rm.logits(model, ids), rm.logits(theirs, ids)) <= TOL


def test_keys_on_no_module_and_missing_keys_are_refused(bases, tmp_path):
    base = bases["llama"]
    folder = _saved(base, tmp_path / "a", LoraConfig(r=2, target_modules=["q_proj"]))
    ghost = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    _edit_keys(folder, lambda t: t | {ghost: torch.zeros(2, 64)})
    _refused(base, folder, rf"keys for modules this LlamaForCausalLM lacks: {ghost}")
    folder = _saved(base, tmp_path / "b", LoraConfig(r=2, target_modules=["q_proj"]))
    lost = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    _edit_keys(folder, lambda t: {k: v for k, v in t.items() if k != lost})
    _refused(base, folder, r"missing keys: model\.layers\.1\.self_attn\.q_proj\.lora_B")
    folder = _saved(base, tmp_path / "c", LoraConfig(r=2, target_modules=["q_proj"]))
    _edit_keys(folder, lambda t: t | {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                                      torch.ones(64)})
    _refused(base, folder, "keys that are not LORA adapter tensors")
    folder = _saved(base, tmp_path / "d", LoraConfig(r=2, target_modules=["q_proj"]))
    _edit_keys(folder, lambda t: {k: v.to(torch.int32) if k.endswith("lora_A.weight") else v for k, v in t.items()})
    _refused(base, folder, "the lora_A tensors must share one float dtype")


def test_adapter_for_another_architecture_is_refused(bases, tmp_path):
    folder = _saved(bases["gpt2"], tmp_path, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    _refused(bases["llama"], folder, r"target_modules=\['c_attn'\].*matches no linear-like module")


def test_folders_without_config_or_safetensors_are_refused(bases, tmp_path):
    _refused(bases["llama"], tmp_path, "folder without adapter_config.json")
    folder = _saved(bases["llama"], tmp_path / "p", LoraConfig(r=2, target_modules=["q_proj"]))
    os.replace(folder / "adapter_model.safetensors", folder / "adapter_model.bin")
    _refused(bases["llama"], folder, "a pickle, which lora-lite never opens", FileNotFoundError)
