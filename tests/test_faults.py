"""Faults and hostile files, the second sweep (issue 13): nothing silently wrong, nothing lost, nothing hangs.

Each case of the issue is a test here, with two more of the same kind beside it (another hostile value,
another wrapper, another dtype). Every refused call leaves the model exactly as it was (tiny.refused).
"""
import errno
import json
import os
import re
import threading
import warnings

import pytest
import tiny
import torch
from safetensors import SafetensorError
from tiny import perturb, raw, refused, rewrite
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_lite as ll
from lora_lite import adapter_file, wrappers
from lora_lite.config import INT64_MAX


def _saved(tmp_path, name="lora", model=None, **kw):
    model = model or tiny.TinyLM()
    ll.attach(model, tiny.cfg_for(name, **kw))
    perturb(model)
    path = tmp_path / f"{name}.safetensors"
    ll.save(model, path)
    return path


def _edit(path, key_end, fn):
    """A copy of `path` with fn applied to the first tensor whose key ends in key_end; returns (copy, key)."""
    key = sorted(k for k in raw(path)[0] if k.endswith(key_end))[0]
    return rewrite(path, path.with_name("bad.safetensors"), edit_tensors=lambda t: t.update({key: fn(t[key])})), key


# --- files: values ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_naming_the_key(tmp_path, value):
    bad, key = _edit(_saved(tmp_path), "lora_A", lambda t: t.index_fill(0, torch.tensor([0]), value))
    model = tiny.TinyLM()
    refused(model, ValueError, rf"invalid values: .*{re.escape(key)}: non-finite", ll.load, model, bad)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.uint8, torch.complex64, torch.int64])
def test_non_float_tensor_for_a_float_adapter_is_refused(tmp_path, dtype):
    bad, key = _edit(_saved(tmp_path), "lora_B", lambda t: t.to(dtype))
    model = tiny.TinyLM()
    refused(model, ValueError, rf"{re.escape(key)}: dtype {str(dtype)[6:]}, expected floating", ll.load, model, bad)


@pytest.mark.parametrize("value", [1e300, -1e300, 1e39])
def test_float64_value_that_overflows_the_adapter_dtype_is_refused(tmp_path, value):
    bad, key = _edit(_saved(tmp_path), "lora_A", lambda t: t.double().index_fill(1, torch.tensor([3]), value))
    model = tiny.TinyLM()
    refused(model, ValueError, rf"{re.escape(key)}: non-finite .*after the cast to torch.float32", ll.load, model, bad)


@pytest.mark.parametrize("step", [-5, -1, -2**63])
def test_negative_singlora_step_is_refused(tmp_path, step):
    bad, key = _edit(_saved(tmp_path, "singlora"), "lora_step", lambda t: torch.tensor(step, dtype=torch.int64))
    model = tiny.TinyLM()
    refused(model, ValueError, rf"{re.escape(key)}: breaks singlora's invariant", ll.load, model, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.bool])
def test_singlora_step_of_another_type_is_refused(tmp_path, dtype):
    bad, key = _edit(_saved(tmp_path, "singlora"), "lora_step", lambda t: t.to(dtype))
    model = tiny.TinyLM()
    refused(model, ValueError, rf"{re.escape(key)}: dtype .*expected torch.int64", ll.load, model, bad)


@pytest.mark.parametrize("value,why", [(-1.0, "breaks delora's invariant"), (float("nan"), "non-finite"),
                                       (float("-inf"), "non-finite"), (-1e-30, "breaks delora's invariant")])
def test_bad_delora_norm_is_refused(tmp_path, value, why):
    bad, key = _edit(_saved(tmp_path, "delora"), "lora_wnorm", lambda t: t.index_fill(0, torch.tensor([2]), value))
    model = tiny.TinyLM()
    refused(model, ValueError, rf"{re.escape(key)}: {why}", ll.load, model, bad)


# --- files: keys and wrapper prefixes ---------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_two_file_keys_for_one_tensor_are_refused_naming_both(tmp_path, prefix):
    path = _saved(tmp_path)
    key = sorted(raw(path)[0])[0]
    bad = rewrite(path, tmp_path / "bad.safetensors", edit_tensors=lambda t: t.update({prefix + key: t[key] + 1}))
    model = tiny.TinyLM()
    refused(model, ValueError, rf"more than once: {re.escape(key)} and {re.escape(prefix + key)}|"
                               rf"more than once: {re.escape(prefix + key)} and {re.escape(key)}", ll.load, model, bad)


def test_wrapper_prefix_inside_a_key_is_a_duplicate_too(tmp_path):
    path = _saved(tmp_path)
    key = "layers.0.q_proj.lora_A"
    inner = "layers.0._orig_mod.q_proj.lora_A"
    bad = rewrite(path, tmp_path / "bad.safetensors", edit_tensors=lambda t: t.update({inner: t[key].clone()}))
    model = tiny.TinyLM()
    refused(model, ValueError, re.escape(f"{inner} and {key}"), ll.load, model, bad)


def test_two_targets_for_one_module_are_refused(tmp_path):
    path = _saved(tmp_path)

    def dup(meta):
        return {**meta, "targets": json.dumps(json.loads(meta["targets"]) + ["module.layers.0.q_proj"])}

    bad = rewrite(path, tmp_path / "bad.safetensors", metadata=dup)
    model = tiny.TinyLM()
    refused(model, ValueError, r"targets name the same module more than once: layers\.0\.q_proj and module\.",
            ll.load, model, bad)


class Holder(nn.Module):
    """A model whose own top-level child has a wrapper's attribute name."""

    def __init__(self, child: str):
        super().__init__()
        self.child = child
        setattr(self, child, tiny.TinyLM())

    def forward(self, ids):
        return getattr(self, self.child)(ids)


@pytest.mark.parametrize("child,wrap", [("module", None), ("_orig_mod", None), ("module", nn.DataParallel)])
def test_a_model_with_a_child_named_like_a_wrapper_round_trips(tmp_path, child, wrap):
    model = Holder(child)
    outer = wrap(model) if wrap else model
    ll.attach(outer, ll.LoRAConfig(r=2))
    perturb(model)
    assert ll.adapted_layers(outer)[0][0].startswith(f"{child}.layers.0.")
    path = tmp_path / "a.safetensors"
    ll.save(outer, path)
    ids = tiny.tokens()
    with torch.no_grad():
        want = model(ids)
    fresh = Holder(child)
    ll.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(ids), want)


def test_a_plain_child_named_orig_mod_is_not_a_compiled_model():
    model = Holder("_orig_mod")
    assert not wrappers.is_compiled(model) and wrappers.unwrap(model) is model
    assert wrappers.wrapper_prefixes(model) == ()
    assert wrappers.wrapper_prefixes(nn.DataParallel(model)) == ("module.",)
    assert wrappers.unwrap(nn.DataParallel(model)) is model


# --- files: dtype travels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_save_after_model_to_dtype_reloads_exactly(tmp_path, variant_name, dtype):
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for(variant_name))
    perturb(model)
    model.to(dtype)
    path = tmp_path / "a.safetensors"
    ll.save(model, path)
    assert json.loads(raw(path)[1]["config"])["dtype"] == str(dtype)[6:]
    ids = tiny.tokens()
    fresh = tiny.TinyLM().to(dtype)
    ll.load(fresh, path)
    for k, v in tiny.lora_tensors(model).items():
        got = tiny.lora_tensors(fresh)[k]
        assert got.dtype == v.dtype and torch.equal(got, v), k
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


# --- not a file -------------------------------------------------------------------------------------------------

def test_load_on_a_fifo_refuses_without_blocking(tmp_path):
    fifo = tmp_path / "adapter.safetensors"
    os.mkfifo(fifo)
    model = tiny.TinyLM()
    errors = []

    def call():
        try:
            ll.load(model, fifo)
        except Exception as e:
            errors.append(e)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(60)  # a hang guard, not a timing: a blocked open of a FIFO never returns by itself
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the reader, then fail
        thread.join()
        pytest.fail("ll.load blocked on a FIFO")
    assert len(errors) == 1 and isinstance(errors[0], ValueError), errors
    assert "not a regular file" in str(errors[0]) and str(fifo) in str(errors[0])
    assert ll.adapted_layers(model) == []


def test_load_on_a_device_says_not_a_regular_file():
    model = tiny.TinyLM()
    refused(model, ValueError, "/dev/null is not a regular file", ll.load, model, "/dev/null")


def test_load_on_a_folder_without_a_peft_config_says_so(tmp_path):
    model = tiny.TinyLM()
    refused(model, ValueError, rf"{re.escape(str(tmp_path))} is a folder without adapter_config.json", ll.load,
            model, tmp_path)


@pytest.mark.parametrize("path", [b"adapter.safetensors", 0, None])
def test_path_of_the_wrong_type_is_a_type_error(path):
    model = tiny.TinyLM()
    refused(model, TypeError, "path must be a str or os.PathLike", ll.load, model, path)
    ll.attach(model, ll.LoRAConfig(r=2))
    with pytest.raises(TypeError, match="path must be a str"):
        ll.save(model, path)


# --- metadata bombs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["config", "targets"])
def test_metadata_nested_ten_thousand_deep(tmp_path, field):
    path = _saved(tmp_path)
    bomb = "[" * 10_000 + "]" * 10_000
    bad = rewrite(path, tmp_path / "bad.safetensors", metadata=lambda m: {**m, field: bomb})
    model = tiny.TinyLM()
    refused(model, ValueError, rf"{re.escape(str(bad))}: malformed metadata JSON in field '{field}'", ll.load, model, bad)


def test_nested_bomb_inside_a_config_value(tmp_path):
    path = _saved(tmp_path)
    bomb = '{"variant": "lora", "r": ' + "[" * 10_000 + "]" * 10_000 + "}"
    bad = rewrite(path, tmp_path / "bad.safetensors", metadata=lambda m: {**m, "config": bomb})
    model = tiny.TinyLM()
    refused(model, ValueError, "malformed metadata JSON in field 'config'", ll.load, model, bad)


@pytest.mark.parametrize("digits,match", [(5000, "malformed metadata JSON in field 'config'"),
                                          (4000, r"r must be an int in \[\d, \d+\], got an int of \d+ bits"),
                                          (19, r"r=1111111111111111111; largest: ")])
def test_huge_r_in_a_file(tmp_path, digits, match):
    path = _saved(tmp_path)

    def edit(meta):
        return {**meta, "config": re.sub(r'"r": \d+', f'"r": {"1" * digits}', meta["config"])}

    bad = rewrite(path, tmp_path / "bad.safetensors", metadata=edit)
    model = tiny.TinyLM()
    err = refused(model, (ValueError, MemoryError), match, ll.load, model, bad)
    assert str(bad) in str(err) and len(str(err)) < 1000


@pytest.mark.parametrize("variant", [["lora"], {"lora": 1}, 7, "x" * 2**20])
def test_variant_that_is_not_a_name(tmp_path, variant):
    bad = rewrite(_saved(tmp_path), tmp_path / "bad.safetensors", edit_config=lambda c: c.update(variant=variant))
    model = tiny.TinyLM()
    err = refused(model, ValueError, "unknown variant", ll.load, model, bad)
    assert str(bad) in str(err) and len(str(err)) < 1000


def test_a_mebibyte_junk_key_gives_a_short_error(tmp_path):
    junk = "x" * 2**20
    bad = rewrite(_saved(tmp_path), tmp_path / "bad.safetensors", edit_tensors=lambda t: t.update({junk: torch.ones(1)}))
    model = tiny.TinyLM()
    err = refused(model, ValueError, r"unexpected keys: x{200}\.\.\.", ll.load, model, bad)
    assert len(str(err)) < 2000


def test_a_mebibyte_target_name_gives_a_short_error(tmp_path):
    junk = "y" * 2**20
    bad = rewrite(_saved(tmp_path), tmp_path / "bad.safetensors", metadata=lambda m: {**m, "targets": json.dumps([junk])})
    model = tiny.TinyLM()
    err = refused(model, ValueError, r"targets modules this model lacks .*y{200}\.\.\.", ll.load, model, bad)
    assert len(str(err)) < 2000


def test_thousands_of_junk_keys_are_listed_in_part(tmp_path):
    extra = {f"junk{i}": torch.ones(1) for i in range(3000)}
    bad = rewrite(_saved(tmp_path), tmp_path / "bad.safetensors", edit_tensors=lambda t: t.update(extra))
    model = tiny.TinyLM()
    err = refused(model, ValueError, r"\(3000 in all\)", ll.load, model, bad)
    assert len(str(err)) < 5000


# --- a regex from a file is never run ---------------------------------------------------------------------------

class LongNames(nn.Module):
    """Module paths of 60 word characters: `^([\\w.]+)+!` backtracks 2**60 times on each."""

    def __init__(self):
        super().__init__()
        self.add_module("a" * 60, nn.Linear(8, 8))
        self.add_module("b" * 60, nn.Linear(8, 8))

    def forward(self, x):
        return getattr(self, "b" * 60)(getattr(self, "a" * 60)(x))


@pytest.mark.parametrize("pattern", [r"^([\w.]+)+!", r"(a|aa)+$x", r"^(\w+\s?)*!"])
def test_file_patterns_are_never_run(tmp_path, monkeypatch, pattern):
    model = LongNames()
    ll.attach(model, ll.LoRAConfig(r=2, target_roles=()))
    path = tmp_path / "a.safetensors"
    ll.save(model, path)
    bad = rewrite(path, tmp_path / "bad.safetensors", edit_config=lambda c: c.update(target_names=[pattern]))
    ran = []
    for fn in ("search", "match", "fullmatch", "findall", "finditer"):
        real = getattr(re, fn)
        monkeypatch.setattr(re, fn, lambda p, *a, real=real, **k: ran.append(p) if p == pattern else real(p, *a, **k))
    fresh = LongNames()
    ll.load(fresh, bad)
    text = ll.summary(fresh)
    assert ran == [] and "a" * 60 in text and "b" * 60 in text
    assert fresh.__dict__.get("lora_pattern_hits") is None


def test_summary_shows_the_hits_recorded_at_attach():
    model = tiny.TinyLM()
    ll.attach(model, ll.LoRAConfig(r=2, target_names=("q_proj", r"layers\.1\.")))
    text = ll.summary(model)
    assert "target_names 'q_proj' matched 2" in text and r"target_names 'layers\\.1\\.' matched 7" in text


# --- save -------------------------------------------------------------------------------------------------------

def test_save_writes_a_snapshot_taken_before_writing(tmp_path, monkeypatch):
    """An update that lands while the file is being written (another thread's optimizer step) is not in it."""
    model = tiny.TinyLM()
    ll.attach(model, ll.LoRAConfig(r=2))
    perturb(model)
    before = {k: v.clone() for k, v in tiny.lora_tensors(model).items()}
    real = adapter_file.save_file

    def update_meanwhile(tensors, filename, metadata=None):
        with torch.no_grad():
            for p in tiny.lora_tensors(model).values():
                p.add_(1.0)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(adapter_file, "save_file", update_meanwhile)
    path = tmp_path / "a.safetensors"
    for _ in range(3):  # each save is of the state at its start
        ll.save(model, path)
        assert all(torch.equal(raw(path)[0][k], v) for k, v in before.items())
        before = {k: v.clone() for k, v in tiny.lora_tensors(model).items()}


def test_saved_tensors_share_no_memory_with_the_model():
    model = tiny.TinyLM()
    ll.attach(model, ll.LoRAConfig(r=2))
    ptrs = {t.untyped_storage().data_ptr() for t in tiny.lora_tensors(model).values()}
    assert not ptrs & {t.untyped_storage().data_ptr() for t in adapter_file.snapshot(model).values()}


@pytest.mark.parametrize("failure", [
    SafetensorError("No space left on device (os error 28)"),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
])
def test_disk_full_is_an_os_error_naming_the_path_and_keeps_the_old_file(tmp_path, monkeypatch, failure):
    model = tiny.TinyLM()
    ll.attach(model, ll.LoRAConfig(r=2))
    path = tmp_path / "a.safetensors"
    ll.save(model, path)
    old = path.read_bytes()

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise failure

    monkeypatch.setattr(adapter_file, "save_file", full)
    perturb(model)
    with pytest.raises(OSError, match=rf"cannot write {re.escape(str(path))}"):
        ll.save(model, path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_rename_failure_names_the_path(tmp_path, monkeypatch):
    model = tiny.TinyLM()
    ll.attach(model, ll.LoRAConfig(r=2))

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(adapter_file.os, "replace", refuse)
    path = tmp_path / "a.safetensors"
    with pytest.raises(PermissionError, match=rf"cannot write {re.escape(str(path))}"):
        ll.save(model, path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a" * 238 + ".safetensors", "b" * 243 + ".safetensors",
                                  "é" * 120 + ".safetensors", "語" * 81 + ".safetensors"])
def test_long_legal_file_names_save(tmp_path, name):
    assert len(os.fsencode(name)) <= 255
    model = tiny.TinyLM()
    ll.attach(model, ll.LoRAConfig(r=2))
    perturb(model)
    ll.save(model, tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    fresh = tiny.TinyLM()
    ll.load(fresh, tmp_path / name)
    assert all(torch.equal(v, tiny.lora_tensors(model)[k]) for k, v in tiny.lora_tensors(fresh).items())


# --- numerics and config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, -1.0, -1e-12])
def test_pissa_alpha_not_positive_is_refused(alpha):
    with pytest.raises(ValueError, match=rf"PiSSA alpha must be > 0.*alpha={re.escape(str(alpha))}"):
        ll.PiSSAConfig(r=2, alpha=alpha)


def test_pissa_file_with_alpha_zero_is_refused(tmp_path):
    bad = rewrite(_saved(tmp_path, "pissa"), tmp_path / "bad.safetensors", edit_config=lambda c: c.update(alpha=0.0))
    model = tiny.TinyLM()
    refused(model, ValueError, rf"{re.escape(str(bad))}: PiSSA alpha must be > 0", ll.load, model, bad)


@pytest.mark.parametrize("cls,field,value", [
    ("SingLoRAConfig", "ramp_up_steps", 10**30), ("SingLoRAConfig", "ramp_up_steps", 2**63),
    ("PiSSAConfig", "niter", 2**64), ("LoRAConfig", "r", 2**63), ("GraLoRAConfig", "hybrid_r", 10**20),
])
def test_int_fields_are_bounded_to_int64(cls, field, value):
    with pytest.raises(ValueError, match=rf"{field} must be an int in \[\d, {INT64_MAX}\]"):
        getattr(ll, cls)(**{field: value})


def test_int64_max_itself_is_a_legal_ramp():
    assert ll.SingLoRAConfig(ramp_up_steps=INT64_MAX).ramp_up_steps == INT64_MAX


def _step_state(model):
    return [(dict(layer.lora_state), int(layer.lora_step)) for _, layer in ll.adapted_layers(model)]


@pytest.mark.parametrize("step", [2**63, 2**64, 10**30, -1])
def test_refused_set_step_changes_nothing(step):
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for("singlora"))
    before = _step_state(model)
    with pytest.raises(ValueError, match=r"step must be >= 0 and < 2\*\*63"):
        ll.set_step(model, step)
    assert _step_state(model) == before


@pytest.mark.parametrize("start,steps", [(INT64_MAX, 1), (INT64_MAX, 2), (INT64_MAX - 2, 5)])
def test_track_steps_saturates_at_int64_max(start, steps):
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for("singlora"))
    ll.set_step(model, start)
    tiny.train(model, tiny.tokens(), steps=steps)
    assert {int(layer.lora_step) for _, layer in ll.adapted_layers(model)} == {INT64_MAX}


@pytest.mark.parametrize("name", ["lora", "delora", "gralora"])
def test_huge_rank_is_a_memory_error_naming_r_and_the_layer(name):
    model = tiny.TinyLM()
    r = 10**9 if name != "gralora" else 2 * 10**9
    refused(model, MemoryError, rf"r={r}; largest: layers\.\d\.\w+, \d+->\d+\): lower r",
            ll.attach, model, tiny.cfg_for(name, r=r))


def test_huge_rank_from_a_file_is_a_memory_error(tmp_path):
    bad = rewrite(_saved(tmp_path), tmp_path / "bad.safetensors", edit_config=lambda c: c.update(r=10**9))
    model = tiny.TinyLM()
    refused(model, MemoryError, rf"{re.escape(str(bad))}: the adapter needs .* \(r=1000000000;", ll.load, model, bad)


def _zeroed(model, *names):
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).weight.zero_()
    return model


@pytest.mark.parametrize("name", ["delora", "pissa"])
@pytest.mark.parametrize("zero", [("layers.0.q_proj",), ("layers.0.q_proj", "layers.1.down_proj")])
def test_dead_adapter_on_an_all_zero_weight_warns_naming_the_layers(name, zero):
    model = _zeroed(tiny.TinyLM(), *zero)
    with pytest.warns(UserWarning, match=rf"{name} can never learn on {re.escape(', '.join(zero))} "
                                         rf"\({len(zero)} layers\): the weight is all zero"):
        ll.attach(model, tiny.cfg_for(name, r=2))
    assert all(torch.isfinite(v).all() for v in tiny.lora_tensors(model).values())


def test_lora_on_an_all_zero_weight_learns_and_does_not_warn():
    model = _zeroed(tiny.TinyLM(), "layers.0.q_proj")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ll.attach(model, ll.LoRAConfig(r=2))


@pytest.mark.parametrize("call", ["attach", "load"])
def test_attach_or_load_inside_inference_mode_is_refused(tmp_path, call):
    path = _saved(tmp_path)
    model = tiny.TinyLM()
    fn, arg = (ll.attach, ll.LoRAConfig(r=2)) if call == "attach" else (ll.load, path)
    with torch.inference_mode():
        refused(model, RuntimeError, "inside torch.inference_mode", fn, model, arg)


def test_attach_under_no_grad_still_trains():
    model = tiny.TinyLM()
    with torch.no_grad():
        ll.attach(model, ll.LoRAConfig(r=2))
    tiny.train(model, tiny.tokens(), steps=1)
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert len(grads) == 28 and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def _peft_model():
    from peft import LoraConfig, get_peft_model
    return get_peft_model(tiny.TinyLM(), LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("inner", [False, True])
def test_attach_on_a_peft_model_says_what_to_do(inner):
    peft_model = _peft_model()
    model = peft_model.base_model.model if inner else peft_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"carries PEFT adapters.*merge_and_unload\(\).*unload\(\)"):
        ll.attach(model, ll.LoRAConfig(r=2))
    assert ll.adapted_layers(model) == [] and not any("lora_requires_grad" in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_peft_model_after_merge_and_unload_attaches():
    model = _peft_model().merge_and_unload()
    ll.attach(model, ll.LoRAConfig(r=2))
    assert len(ll.adapted_layers(model)) == 14


@pytest.mark.parametrize("meta", ["all", "one layer"])
@pytest.mark.parametrize("call", ["attach", "load"])
def test_meta_parameters_are_refused(tmp_path, meta, call):
    path = _saved(tmp_path)
    if meta == "all":
        with torch.device("meta"):
            model = tiny.TinyLM()
    else:
        model = tiny.TinyLM()
        model.layers[1].up_proj.to("meta")
    fn, arg = (ll.attach, ll.LoRAConfig(r=2)) if call == "attach" else (ll.load, path)
    refused(model, ValueError, r"parameters are on the meta device \(e\.g\. .*\): they hold no values", fn, model, arg)


class Keyword(nn.Module):
    """Calls its one layer with a keyword argument, as some model code does."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.proj = Conv1D(16, 8) if kind == "conv1d" else nn.Linear(8, 16)
        nn.init.normal_(self.proj.weight)

    def forward(self, h, keyword=True):
        if not keyword:
            return self.proj(h)
        return self.proj(x=h) if self.kind == "conv1d" else self.proj(input=h)


@pytest.mark.parametrize("kind", ["conv1d", "linear"])
def test_layer_called_with_a_keyword_is_adapted(kind):
    model = Keyword(kind)
    h = torch.randn(3, 5, 8)
    with torch.no_grad():
        base = model(h, keyword=False)
    ll.attach(model, ll.LoRAConfig(r=2, target_roles=()))
    perturb(model)
    with torch.no_grad():
        kw, positional = model(h), model(h, keyword=False)
    assert torch.equal(kw, positional) and not torch.equal(kw, base)


class Reused(nn.Module):
    """One nn.Linear instance reached by several paths."""

    def __init__(self, paths):
        super().__init__()
        torch.manual_seed(0)
        lin = nn.Linear(8, 8)
        if paths == "attributes":
            self.a, self.b = lin, lin
            self.stack = [lin, lin]
        else:
            self.seq = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), lin)
            self.stack = [lin] * 3

    def forward(self, x):
        for lin in self.stack:
            x = torch.tanh(lin(x))
        return x


@pytest.mark.parametrize("paths", ["attributes", "sequential"])
def test_one_linear_at_several_paths_merges_once(paths):
    model = Reused(paths)
    ll.attach(model, ll.LoRAConfig(r=2, target_roles=()))
    perturb(model)
    (_, layer), = ll.adapted_layers(model)
    want = layer.weight + layer.lora_variant.delta_weight(layer)
    x = torch.randn(4, 8)
    with torch.no_grad():
        hooked = model(x)
    ll.merge(model)
    assert torch.allclose(layer.weight, want, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hooked, atol=1e-5, rtol=0)


def test_a_weight_shared_by_two_modules_is_still_refused():
    model = Reused("attributes")
    model.b = nn.Linear(8, 8)
    model.b.weight = model.a.weight
    model.stack = [model.a, model.b]
    ll.attach(model, ll.LoRAConfig(r=2, target_roles=(), target_names=("^a$",)))
    with pytest.raises(ValueError, match=r"the weight of a is tied to \['b\.weight'\]"):
        ll.merge(model)
    assert len(ll.adapted_layers(model)) == 1
