"""Everyday workflows: ll.disabled (the bare base inside a block), ll.swap (new values in place), ll.summary at a
glance. Compiled checks count dynamo's frames with aot_eager underneath, as tests/test_compile.py compiles."""
import copy

import pytest
import tiny
import torch
from peft import LoraConfig, get_peft_model
from tiny import assert_restored, perturb, refused, rewrite, snapshot
from torch._dynamo.testing import CompileCounterWithBackend

import lora_lite as ll


def _llama():
    torch.manual_seed(0)  # the same base each time: a file from one fits another exactly
    return tiny.llama()


def _trained(model, cfg, seed=0):
    ll.attach(model, cfg)
    perturb(model, seed=seed)
    return model


# --- ll.disabled ------------------------------------------------------------------------------------------------

def test_dpo_reference_pass_is_the_bare_base_while_training_goes_on():
    model, ids = tiny.llama(), tiny.tokens(2, 8, vocab=tiny.VOCAB)
    with torch.no_grad():
        base = tiny.logits(model, ids)
    ll.attach(model, ll.LoRAConfig(r=4, alpha=8))
    adapter = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(adapter, lr=1e-2)
    seen = []
    for _ in range(3):  # a step before and after each reference pass
        with ll.disabled(model):
            ref = tiny.logits(model, ids)  # grad mode on, as in a DPO step: still no adapter in the graph
        assert torch.equal(ref, base) and not ref.requires_grad
        opt.zero_grad()
        loss = tiny.loss_of(model, ids) + (tiny.logits(model, ids) - ref).pow(2).mean()
        loss.backward()
        opt.step()
        seen.append([p.detach().clone() for p in adapter])
        assert all(p.grad is not None for p in adapter)
    assert all(not torch.equal(a, b) for a, b in zip(seen[1], seen[2]))  # the adapter kept moving
    with torch.no_grad():
        assert not torch.equal(tiny.logits(model, ids), base)


def test_disabled_nests_and_is_restored_when_the_block_raises(variant_name):
    model, ids = tiny.TinyLM(), tiny.tokens()
    base = model(ids)
    adapted = _trained(model, tiny.cfg_for(variant_name))(ids)
    with ll.disabled(model):
        with ll.disabled(model):
            assert torch.equal(model(ids), base)
        assert torch.equal(model(ids), base)  # the inner exit leaves it disabled
    assert torch.equal(model(ids), adapted)
    with pytest.raises(KeyError):
        with ll.disabled(model):
            raise KeyError("in the block")
    assert torch.equal(model(ids), adapted)


def test_disabled_takes_effect_on_a_compiled_model():
    torch._dynamo.reset()
    model, ids = tiny.TinyLM(d=16, f=32, n_layers=1), tiny.tokens(2, 8)
    base = model(ids)
    adapted = _trained(model, tiny.cfg_for("lora"))(ids)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    assert torch.allclose(compiled(ids), adapted, atol=1e-6)
    with ll.disabled(compiled):
        assert torch.equal(compiled(ids), base)
        with ll.disabled(model):
            assert torch.equal(compiled(ids), base)
    assert torch.allclose(compiled(ids), adapted, atol=1e-6)
    with ll.disabled(model):
        assert torch.equal(compiled(ids), base)
    assert counter.frame_count == 2  # one graph each way, both reused; nesting compiles nothing


def test_disabled_without_an_adapter_is_an_error():
    with pytest.raises(ValueError, match="no adapter is attached"):
        with ll.disabled(tiny.TinyLM()):
            pass


def test_detach_inside_disabled_leaves_nothing_behind():
    model = tiny.TinyLM()
    snap = snapshot(model)
    ll.attach(model, tiny.cfg_for("lora"))
    with ll.disabled(model):
        ll.detach(model)
    assert_restored(model, snap)


# --- ll.swap ----------------------------------------------------------------------------------------------------

def _file(tmp_path, name, cfg, seed, model_fn=tiny.TinyLM):
    donor = _trained(model_fn(), cfg, seed=seed)
    ll.save(donor, tmp_path / name)
    return tmp_path / name, donor


def test_swap_keeps_an_existing_optimizer_training(tmp_path):
    path, donor = _file(tmp_path, "b.safetensors", ll.LoRAConfig(r=4, alpha=8), seed=1, model_fn=_llama)
    model, ids = _trained(_llama(), ll.LoRAConfig(r=4, alpha=8)), tiny.tokens(2, 8, vocab=tiny.VOCAB)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ll.swap(model, path)
    assert [p for p in model.parameters() if p.requires_grad] == params  # the same objects
    with torch.no_grad():
        assert torch.equal(tiny.logits(model, ids), tiny.logits(donor, ids))
    swapped = [p.detach().clone() for p in params]
    opt.zero_grad()
    tiny.loss_of(model, ids).backward()
    opt.step()
    assert all(not torch.equal(p, s) for p, s in zip(params, swapped))  # the optimizer moved the swapped values


def test_swap_on_a_compiled_model_does_not_recompile(tmp_path):
    torch._dynamo.reset()
    path, donor = _file(tmp_path, "b.safetensors", tiny.cfg_for("lora"), seed=1)
    model, ids = _trained(tiny.TinyLM(), tiny.cfg_for("lora")), tiny.tokens()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    before = compiled(ids)
    ll.swap(compiled, path)
    after = compiled(ids)
    assert not torch.allclose(before, after) and torch.allclose(after, donor(ids), atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.parametrize("case, match", [
    ("variant", "holds a pissa adapter"), ("r", "r: file 2 vs attached 4"),
    ("alpha", "alpha: file 3.0 vs attached 8.0"),
    ("targets", "adapted here, not in the file"), ("shape", "wrong shapes"), ("dtype", "another dtype"),
    ("nan", "non-finite"), ("missing", "nope.safetensors")])
def test_swap_mismatch_is_an_error_and_changes_nothing(tmp_path, case, match):
    good = tiny.cfg_for("lora")
    files = {"variant": lambda: _file(tmp_path, "v", tiny.cfg_for("pissa"), 1)[0],
             "r": lambda: _file(tmp_path, "r", tiny.cfg_for("lora", r=2), 1)[0],
             "alpha": lambda: _file(tmp_path, "a", tiny.cfg_for("lora", alpha=3.0), 1)[0],
             "targets": lambda: _file(tmp_path, "t", tiny.cfg_for("lora", target_names=("q_proj",)), 1)[0],
             "dtype": lambda: _file(tmp_path, "d", tiny.cfg_for("lora", dtype=torch.bfloat16), 1)[0],
             "missing": lambda: tmp_path / "nope.safetensors"}
    edits = {"shape": lambda t: t.update({k: torch.zeros(5, 32) for k in t if k.endswith("0.q_proj.lora_A")}),
             "nan": lambda t: next(v for k, v in t.items() if k.endswith("lora_B")).fill_(float("nan"))}
    if case in edits:
        path = rewrite(_file(tmp_path, "g", good, 1)[0], tmp_path / "e", edit_tensors=edits[case])
    else:
        path = files[case]()
    model = _trained(tiny.TinyLM(), good)
    refused(model, (ValueError, FileNotFoundError), match, ll.swap, model, path)


def test_swap_from_a_peft_folder(tmp_path):
    donor = _trained(_llama(), ll.LoRAConfig(r=4, alpha=8), seed=1)
    ll.export_peft(donor, tmp_path / "peft")
    model, ids = _trained(_llama(), ll.LoRAConfig(r=4, alpha=8)), tiny.tokens(2, 8, vocab=tiny.VOCAB)
    ll.swap(model, tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(tiny.logits(model, ids), tiny.logits(donor, ids))


def test_swap_there_and_back_is_exact(tmp_path, variant_name):
    """Every variant's tensors travel, buffers too (PiSSA's factors, DeLoRA's norms, SingLoRA's step)."""
    model, ids = _trained(tiny.TinyLM(), tiny.cfg_for(variant_name)), tiny.tokens()
    ll.set_step(model, 3)
    ll.save(model, tmp_path / "a.safetensors")
    first = model(ids)
    other = _file(tmp_path, "b.safetensors", tiny.cfg_for(variant_name), seed=1)[0]
    ll.swap(model, other)
    assert not torch.equal(model(ids), first)
    ll.swap(model, tmp_path / "a.safetensors")
    assert torch.equal(model(ids), first)


def test_swap_without_an_adapter_points_to_load(tmp_path):
    path = _file(tmp_path, "a.safetensors", tiny.cfg_for("lora"), 1)[0]
    model = tiny.TinyLM()
    refused(model, ValueError, r"use ll\.load", ll.swap, model, path)


# --- ll.summary at a glance -------------------------------------------------------------------------------------

def test_summary_line_matches_peft(capsys):
    base = tiny.llama()
    n_base = sum(p.numel() for p in base.parameters())
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ref.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    ll.attach(base, ll.LoRAConfig(r=4, alpha=8, target_names=("q_proj", "v_proj")))
    assert peft_line in ll.summary(base).splitlines()
    # q: 4 (32 + 32) and v: 4 (32 + 16) per layer, two layers; all params count the adapter too
    assert peft_line.startswith(f"trainable params: 896 || all params: {n_base + 896:,} || trainable%: ")


def test_summary_groups_kinds_and_verbose_lists_layers():
    model = tiny.llama()
    ll.attach(model, ll.LoRAConfig(r=4, alpha=8))
    rows = ll.summary(model).splitlines()
    assert rows[0].split() == ["module", "role", "d_in->d_out", "variant", "r", "trainable"]
    assert rows[1].split() == ["model.layers.*.self_attn.q_proj", "×2", "reader", "32->32", "lora", "4", "512"]
    assert len(rows[1:8]) == 7 and "14 layers adapted, 7 kinds" in rows[8]
    verbose = ll.summary(model, verbose=True).splitlines()
    assert verbose[1].split() == ["model.layers.0.self_attn.q_proj", "reader", "32->32", "lora", "4", "256"]
    assert sum(line.startswith("model.layers.") for line in verbose) == 14


def test_summary_keeps_a_lone_layer_by_name_and_the_structure_lines():
    model = tiny.llama()
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"layers\.1\.self_attn\.q_proj",)))
    lines = ll.summary(model).splitlines()
    assert lines[1].split()[0] == "model.layers.1.self_attn.q_proj" and "×" not in lines[1]
    assert "roles judged against width 32 (the model)" in lines
    assert any(line.startswith("target_names ") and "matched 1" in line for line in lines)
