"""Bad input and failure (issue 8): every mistake a user can make raises a clear error and changes nothing.

The rule for every case: an exception of a meaningful type (ValueError, KeyError, TypeError,
FileNotFoundError) whose message names the culprit (field, module, key, pattern), and the model
exactly as it was before the call: same tensors, no new hooks, no stray `lora_*` attributes, same
requires_grad flags. `tiny.snapshot` / `tiny.assert_unchanged` check all of that, and every test uses them.
docs/errors.md lists these errors for users.
"""
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import tiny
import torch
from safetensors.torch import save_file
from tiny import assert_unchanged, perturb, raw, refused, rewrite, snapshot
from torch import nn

import lora_lite as ll


def chain(*dims) -> nn.Sequential:
    """Linear layers d0->d1->d2..., named "0", "1", ...; use with target_roles=() to adapt all of them."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims, dims[1:])])


class Unnamed(nn.Module):
    """d_model 8 (from the embedding); `mix` is a square 8x8 layer whose name tells no role."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.mix, self.up, self.down = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, ids):
        x = self.embed(ids)
        return self.down(self.up(self.mix(x)))


def test_snapshot_helper_notices_every_kind_of_change():
    """The helper is the spine of this file: prove it catches each thing it claims to check."""
    model = tiny.TinyLM()
    before = snapshot(model)
    assert_unchanged(model, before)
    changes = [
        lambda m: m.layers[0].q_proj.weight.data.add_(1e-3),
        lambda m: m.layers[0].q_proj.register_forward_hook(lambda *a: None),
        lambda m: m.layers[0].q_proj.register_forward_pre_hook(lambda *a: None),
        lambda m: setattr(m.layers[1].o_proj, "lora_scratch", 1),
        lambda m: m.lm_head.weight.requires_grad_(False),
        lambda m: m.layers[0].q_proj.register_buffer("lora_x", torch.zeros(1), persistent=False),
    ]
    for change in changes:
        model = tiny.TinyLM()
        change(model)
        with pytest.raises(AssertionError):
            assert_unchanged(model, before)


# --- config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [0, -1, 2.0, 2.5, True, "8", None])
def test_bad_rank(variant_name, r):
    with pytest.raises((ValueError, TypeError), match=r"\br\b"):
        tiny.cfg_for(variant_name, r=r)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.1", None])
def test_bad_dropout(variant_name, p):
    with pytest.raises((ValueError, TypeError), match="dropout"):
        tiny.cfg_for(variant_name, dropout=p)


@pytest.mark.parametrize("a", ["16", None, True])
def test_bad_alpha(variant_name, a):
    with pytest.raises(TypeError, match="alpha"):
        tiny.cfg_for(variant_name, alpha=a)


@pytest.mark.parametrize("dtype", ["float8", "torch.float32", "int8", torch.int8, "__import__('os')"])
def test_bad_dtype(variant_name, dtype):
    with pytest.raises(TypeError, match="dtype"):
        tiny.cfg_for(variant_name, dtype=dtype)


@pytest.mark.parametrize("field,value,match", [
    ("target_roles", ("readers",), "target_roles"),
    ("target_names", ("q_proj(",), "target_names"),
    ("exclude_names", ("[",), "exclude_names"),
    ("target_names", 5, "target_names"),
    ("layers", (0.5,), "layers"),
    ("layers", ("0",), "layers"),
])
def test_bad_selection_fields(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ll.LoRAConfig(**{field: value})


def test_unknown_variant_from_dict():
    with pytest.raises(ValueError, match="unknown variant 'nope'.*registered"):
        ll.from_dict({"variant": "nope", "r": 4})
    with pytest.raises(ValueError, match="unknown variant None"):
        ll.from_dict({"r": 4})
    with pytest.raises(ValueError, match="unknown config field.*'rank'"):
        ll.from_dict({"variant": "lora", "rank": 4})
    with pytest.raises(TypeError, match="dict"):
        ll.from_dict(["lora", 4])


def test_unregistered_config_class_is_refused():
    """A config subclass nobody registered (or the bare base class) cannot be attached."""
    from dataclasses import dataclass

    @dataclass
    class GhostConfig(ll.AdapterConfig):
        pass

    GhostConfig.variant = "ghost"
    model = tiny.TinyLM()
    refused(model, ValueError, "unknown variant 'ghost'", ll.attach, model, GhostConfig())
    refused(model, ValueError, "unknown variant ''", ll.attach, model, ll.AdapterConfig())
    refused(model, TypeError, "AdapterConfig", ll.attach, model, {"variant": "lora", "r": 4})


def test_gralora_k_must_divide_r():
    cfg_cls = ll.REGISTRY["gralora"].config
    with pytest.raises(ValueError, match=r"\br\b.*\bk\b|\bk\b.*\br\b"):
        cfg_cls(r=6, k=4)


def test_gralora_k_must_divide_every_layer_and_a_midway_failure_leaves_nothing():
    """Only the third layer (8->6) is not divisible by k=4: the error names it; layers 0 and 1 get nothing."""
    model = chain(8, 8, 8, 6)
    cfg = tiny.cfg_for("gralora", r=4, k=4, target_roles=())
    err = refused(model, ValueError, r"\b2\b", ll.attach, model, cfg)
    assert "6" in str(err) and "k" in str(err)
    ll.attach(chain(8, 8, 8, 8), cfg)  # the same config on divisible widths is fine


def test_pissa_rank_larger_than_layer_names_it():
    model = chain(16, 16, 4)
    err = refused(model, ValueError, r"\b1\b", ll.attach, model, tiny.cfg_for("pissa", r=8, target_roles=()))
    assert "8" in str(err)


def test_failed_init_midway_restores_everything(monkeypatch):
    """An init that fails on the third layer (after two layers got tensors and hooks) leaves no trace,
    and restores requires_grad flags the user had set before (one base weight was frozen already)."""
    calls = []

    def init(layer, cfg):
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("init exploded on the third layer")

    monkeypatch.setattr(ll.REGISTRY["lora"], "init", staticmethod(init), raising=False)
    model = tiny.TinyLM()
    model.layers[1].down_proj.weight.requires_grad_(False)
    refused(model, RuntimeError, "third layer", ll.attach, model, ll.LoRAConfig(r=2))
    assert len(calls) == 3


# --- targeting --------------------------------------------------------------------------------------

def test_pattern_matching_nothing_lists_candidates_and_roles(variant_name):
    model = tiny.TinyLM()
    err = refused(model, ValueError, "'q_porj'", ll.attach, model, tiny.cfg_for(variant_name, target_names=(r"q_porj",)))
    msg = str(err)
    assert "layers.0.self_attn" not in msg  # TinyLM has no self_attn: the listing is the real module names
    assert "layers.0.q_proj" in msg and "layers.1.down_proj" in msg
    assert "reader" in msg and "writer" in msg


def test_one_typo_among_good_patterns_is_named():
    model = tiny.TinyLM()
    err = refused(model, ValueError, "'v_prj'", ll.attach, model, ll.LoRAConfig(target_names=(r"q_proj", r"v_prj")))
    assert "'q_proj'" not in str(err).split("Candidates")[0]


def test_pattern_matching_only_excluded_modules():
    model = tiny.TinyLM()
    err = refused(model, ValueError, "'up_proj'.*exclude_names", ll.attach, model,
                ll.LoRAConfig(target_names=("up_proj", "q_proj"), exclude_names=(r"layers\.\d\.up",)))
    assert "['layers.0.up_proj', 'layers.1.up_proj']" in str(err)


def test_selection_that_selects_nothing_lists_candidates():
    """Names match, but the role filter removes everything: the message lists candidates with roles."""
    model = tiny.TinyLM()
    err = refused(model, ValueError, "selected no module", ll.attach, model,
                ll.LoRAConfig(target_names=("gate_proj",), target_roles=("writer",)))
    assert "layers.0.gate_proj (reader 32->64)" in str(err)


def test_layer_indices_that_do_not_exist():
    model = tiny.TinyLM(n_layers=2)
    err = refused(model, ValueError, r"layers \[2, 7\]", ll.attach, model, ll.LoRAConfig(layers=(1, 2, 7)))
    assert "[0, 1]" in str(err)


def test_layers_on_a_model_without_numbered_layers():
    model = chain(8, 8)
    cfg = ll.LoRAConfig(layers=(0,), target_roles=())
    refused(model, ValueError, r"layers \[0\].*present: \[\]", ll.attach, model, cfg)


def test_unresolvable_square_layer_only_matters_when_roles_filter():
    model = Unnamed()
    err = refused(model, ValueError, r"square layer mix", ll.attach, model, ll.LoRAConfig(target_roles=("reader",)))
    assert "target_names" in str(err)  # says what to do
    refused(model, ValueError, r"square layer mix", ll.attach, model, ll.LoRAConfig(target_roles=("writer",)))
    # no role filter needs it: both-roles, no roles, or a name filter that leaves it out
    for cfg in (ll.LoRAConfig(), ll.LoRAConfig(target_roles=()), ll.LoRAConfig(target_names=("up",),
                                                                                target_roles=("reader",))):
        with ll.attached(model, cfg) as handle:
            assert handle.targets


# --- attach / detach --------------------------------------------------------------------------------

def test_attach_twice_raises_and_keeps_the_first(variant_name):
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for(variant_name))
    perturb(model)
    ids = tiny.tokens()
    out = model(ids)
    for second in (tiny.cfg_for(variant_name), ll.LoRAConfig(r=2, target_names=("q_proj",))):
        refused(model, ValueError, "already attached.*detach", ll.attach, model, second)
    assert torch.equal(model(ids), out)


def test_load_onto_an_attached_model_raises_and_keeps_it(tmp_path):
    model = tiny.TinyLM()
    ll.attach(model, ll.LoRAConfig(r=2))
    perturb(model)
    ll.save(model, tmp_path / "a.safetensors")
    refused(model, ValueError, "already attached", ll.load, model, tmp_path / "a.safetensors")


def test_detach_with_nothing_attached_is_a_noop():
    model = tiny.TinyLM()
    model.lm_head.weight.requires_grad_(False)
    before = snapshot(model)
    ll.detach(model)
    assert_unchanged(model, before)
    ll.attach(model, ll.LoRAConfig())
    ll.detach(model)
    ll.detach(model)
    assert_unchanged(model, before)


# --- load -------------------------------------------------------------------------------------------

def _save(tmp_path, name):
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for(name))
    perturb(model)
    path = tmp_path / "adapter.safetensors"
    ll.save(model, path)
    return path


@pytest.fixture
def saved(tmp_path, variant_name):
    """Path of a trained-looking adapter of each variant, saved from tiny.TinyLM(): for the key checks."""
    return _save(tmp_path, variant_name)


@pytest.fixture
def lora_saved(tmp_path):
    """The same for LoRA only: metadata is parsed before any variant code runs, so one variant suffices."""
    return _save(tmp_path, "lora")


def test_clean_file_loads(saved):
    """The baseline the tampered files below are edited from: it loads."""
    model = tiny.TinyLM()
    ll.load(model, saved)
    assert ll.adapted_layers(model)


def test_missing_key(saved, tmp_path):
    key = sorted(raw(saved)[0])[0]
    bad = rewrite(saved, tmp_path / "bad.safetensors", edit_tensors=lambda t: t.pop(key))
    model = tiny.TinyLM()
    refused(model, ValueError, f"missing keys: {key}", ll.load, model, bad)


def test_unexpected_key(saved, tmp_path):
    bad = rewrite(saved, tmp_path / "bad.safetensors",
                  edit_tensors=lambda t: t.update({"layers.0.q_proj.lora_extra": torch.zeros(3)}))
    model = tiny.TinyLM()
    refused(model, ValueError, "unexpected keys: layers.0.q_proj.lora_extra", ll.load, model, bad)


def test_base_weight_key_is_unexpected_and_never_written(lora_saved, tmp_path):
    """A file that smuggles a base tensor must not overwrite the base weight."""
    bad = rewrite(lora_saved, tmp_path / "bad.safetensors",
                  edit_tensors=lambda t: t.update({"lm_head.weight": torch.full((48, 32), 7.0)}))
    model = tiny.TinyLM()
    refused(model, ValueError, "unexpected keys: lm_head.weight", ll.load, model, bad)


def test_wrong_shape(saved, tmp_path):
    tensors = raw(saved)[0]
    key = next(k for k in sorted(tensors) if tensors[k].dim() >= 1 and tensors[k].numel() > 1)
    shape = tuple(tensors[key].shape)

    def shrink(t):
        t[key] = t[key].flatten()[:-1].clone()

    bad = rewrite(saved, tmp_path / "bad.safetensors", edit_tensors=shrink)
    model = tiny.TinyLM()
    err = refused(model, ValueError, f"wrong shapes: {key}", ll.load, model, bad)
    assert str(shape) in str(err)


def test_file_for_another_architecture(saved):
    narrow = tiny.TinyLM(d=16, f=32)  # same module names, other widths
    refused(narrow, ValueError, "wrong shapes", ll.load, narrow, saved)
    other = chain(32, 32)  # other module names
    err = refused(other, ValueError, "another architecture", ll.load, other, saved)
    assert "layers.0.q_proj" in str(err)


def test_truncated_file(lora_saved, tmp_path):
    data = lora_saved.read_bytes()
    for n in (0, 7, 40, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{n}.safetensors"
        bad.write_bytes(data[:n])
        model = tiny.TinyLM()
        refused(model, ValueError, "cut.*not a valid safetensors file", ll.load, model, bad)


def test_missing_file(tmp_path):
    model = tiny.TinyLM()
    refused(model, FileNotFoundError, "nowhere", ll.load, model, tmp_path / "nowhere.safetensors")


def test_directory_instead_of_file(tmp_path):
    model = tiny.TinyLM()
    refused(model, (ValueError, IsADirectoryError), str(tmp_path.name), ll.load, model, tmp_path)


def _trap(marker):
    """Runs only if something unpickles a Trap: leaves a marker file behind."""
    with open(marker, "w") as f:
        f.write("unpickled")
    return "trapped"


class Trap:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _trap, (str(self.marker),)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_is_never_unpickled(tmp_path, writer):
    marker = tmp_path / "marker"
    bad = tmp_path / "adapter.safetensors"
    payload = {"layers.0.q_proj.lora_A": torch.zeros(4, 32), "trap": Trap(marker)}
    if writer == "torch.save":
        torch.save(payload, bad)
    else:
        bad.write_bytes(pickle.dumps(payload))
    model = tiny.TinyLM()
    refused(model, ValueError, "not a valid safetensors file", ll.load, model, bad)
    with pytest.raises(ValueError):
        ll.read(bad)
    assert not marker.exists(), "the file was unpickled"
    # the trap is real: unpickling the same bytes does run it
    if writer == "torch.save":
        torch.load(io.BytesIO(bad.read_bytes()), weights_only=False)  # by path, torch would try safetensors
    else:
        pickle.loads(bad.read_bytes())
    assert marker.exists()


def test_metadata_with_unknown_config_field(lora_saved, tmp_path):
    bad = rewrite(lora_saved, tmp_path / "bad.safetensors", edit_config=lambda c: c.update(rank=4))
    model = tiny.TinyLM()
    refused(model, ValueError, r"unknown config field.*'rank'", ll.load, model, bad)


@pytest.mark.parametrize("field,value,exc,match", [
    ("dtype", "__import__('os').system('touch {marker}')", TypeError, "dtype"),
    ("dtype", "torch.nn.Module", TypeError, "dtype"),
    ("dtype", "float32; import os", TypeError, "dtype"),
    ("dtype", {"__class__": "torch.float32"}, TypeError, "dtype"),
    ("variant", "os.system", ValueError, "unknown variant 'os.system'"),
    ("variant", "__import__('os').system('touch {marker}')", ValueError, "unknown variant"),
    ("r", "__import__('os').system('touch {marker}')", ValueError, r"\br\b"),
    ("alpha", "exec('open(\"{marker}\", \"w\")')", TypeError, "alpha"),
    ("dropout", "eval('0.1')", TypeError, "dropout"),
    ("target_roles", ["__import__('os')"], ValueError, "target_roles"),
    ("layers", ["os.system"], TypeError, "layers"),
])
def test_metadata_that_tries_to_inject_code(lora_saved, tmp_path, field, value, exc, match):
    """Values are only ever compared against fixed tables: never eval'd, imported, getattr'd or unpickled."""
    marker = tmp_path / "pwned"
    if isinstance(value, str):
        value = value.format(marker=marker)
    bad = rewrite(lora_saved, tmp_path / "bad.safetensors", edit_config=lambda c: c.update({field: value}))
    model = tiny.TinyLM()
    refused(model, exc, match, ll.load, model, bad)
    assert not marker.exists()


@pytest.mark.parametrize("edit,match", [
    (lambda m: {**m, "config": "{not json"}, "malformed metadata JSON"),
    (lambda m: {**m, "targets": "layers.0.q_proj"}, "malformed metadata JSON|targets"),
    (lambda m: {**m, "targets": json.dumps({"a": 1})}, "targets"),
    (lambda m: {**m, "config": json.dumps(["lora", 4])}, "dict"),
    (lambda m: {k: v for k, v in m.items() if k != "config"}, "no lora-lite metadata"),
    (lambda m: {}, "no lora-lite metadata"),
])
def test_malformed_metadata(lora_saved, tmp_path, edit, match):
    bad = rewrite(lora_saved, tmp_path / "bad.safetensors", metadata=edit)
    model = tiny.TinyLM()
    refused(model, (ValueError, TypeError), match, ll.load, model, bad)


def test_duplicate_or_empty_targets(lora_saved, tmp_path):
    def dup(meta):
        names = json.loads(meta["targets"])
        return {**meta, "targets": json.dumps(names + names[:1])}

    model = tiny.TinyLM()
    bad = rewrite(lora_saved, tmp_path / "dup.safetensors", metadata=dup)
    refused(model, ValueError, "more than once.*layers.0", ll.load, model, bad)
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty), metadata={**raw(lora_saved)[1], "targets": "[]"})
    refused(model, ValueError, "no target", ll.load, model, empty)


# --- save -------------------------------------------------------------------------------------------

def test_save_with_nothing_attached(tmp_path):
    model = tiny.TinyLM()
    refused(model, ValueError, "nothing to save", ll.save, model, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_temp_file(tmp_path):
    model = tiny.TinyLM()
    ll.attach(model, ll.LoRAConfig(r=2))
    (tmp_path / "taken").mkdir()
    refused(model, OSError, "taken", ll.save, model, tmp_path / "taken")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    refused(model, FileNotFoundError, "no/such", ll.save, model, tmp_path / "no" / "such" / "dir.safetensors")


SAVER = textwrap.dedent("""
    import sys, time, torch, lora_lite as ll
    from lora_lite import adapter_file as adapter
    path, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024))
    ll.attach(model, ll.LoRAConfig(r=256, target_roles=()))   # 2 MiB of adapter per save
    real_save_file = adapter.save_file

    def slow_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        print("temp file written", flush=True)
        time.sleep(60)  # killed here: the temp file is complete, the rename has not happened

    for i in range(10**6):
        with torch.no_grad():
            for p in (model[0].lora_A, model[0].lora_B):
                p.fill_(i)
        if mode == "slow" and i == 1:
            adapter.save_file = slow_save_file
        ll.save(model, path)
        print("saved", i, flush=True)
""")


def _kill_mid_save(path, mode, wait_for):
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        while not seen or not seen[-1].startswith(wait_for):
            line = proc.stdout.readline()
            assert line, f"saver died: {seen} {proc.stderr.read()}"
            seen.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        seen += proc.stdout.read().split("\n")  # whatever it printed before the kill landed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return [int(s.split()[1]) for s in seen if s.startswith("saved")]


def _check_consistent(path):
    """The file at `path` is one whole save: every value equals the same counter. Returns the counter."""
    model = chain(1024, 1024)
    ll.load(model, path)
    value = model[0].lora_A[0, 0].item()
    assert torch.equal(model[0].lora_A, torch.full((256, 1024), value))
    assert torch.equal(model[0].lora_B, torch.full((1024, 256), value))
    return value


def test_killed_between_write_and_rename_keeps_previous_file(tmp_path):
    """SIGKILL after the temp file of save #1 is written but before the rename: save #0 is what loads."""
    path = tmp_path / "adapter.safetensors"
    saves = _kill_mid_save(path, "slow", "temp file written")
    assert saves == [0]
    assert _check_consistent(path) == 0
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    # what a crash leaves: one hidden temp file, named so that no *.safetensors glob picks it up
    assert len(leftovers) == 1 and leftovers[0].startswith(".adapter.safetensors.") and leftovers[0].endswith(".tmp")
    # and it gets in nobody's way: saving again replaces the file and loads
    model = chain(1024, 1024)
    ll.load(model, path)
    with torch.no_grad():
        model[0].lora_B.fill_(5.0)
        model[0].lora_A.fill_(5.0)
    ll.save(model, path)
    assert _check_consistent(path) == 5.0
    assert sorted(tmp_path.glob("*.safetensors")) == [path]


def test_killed_while_saving_repeatedly_leaves_one_whole_file(tmp_path):
    """SIGKILL at an arbitrary point of a tight save loop: the file is whole, from one save, either the
    last one reported or the one after it (renamed, killed before it could print)."""
    path = tmp_path / "adapter.safetensors"
    saves = _kill_mid_save(path, "fast", "saved 3")
    value = _check_consistent(path)
    assert value in (saves[-1], saves[-1] + 1)
    assert sorted(tmp_path.glob("*.safetensors")) == [path]


# --- merge ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_refuses_non_finite_update_before_touching_weights(variant_name, bad):
    """Only the LAST adapted layer is poisoned, so a merge that went layer by layer would already have
    written the others: every base weight must still be bit-identical, and the adapter still attached."""
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for(variant_name))
    perturb(model)
    name, layer = ll.adapted_layers(model)[-1]
    with torch.no_grad():
        for t in list(layer._parameters.values()) + list(layer._buffers.values()):
            if t is not None and t.is_floating_point() and t.numel() > 0:
                t.fill_(bad)
    refused(model, ValueError, f"{name}.*not finite", ll.merge, model)


def test_merge_refuses_update_that_overflows_the_weight_dtype():
    """Finite in float32, inf once cast to a float16 weight: refused too."""
    model = chain(8, 8).half()
    ll.attach(model, ll.LoRAConfig(r=2, target_roles=()))
    with torch.no_grad():
        model[0].lora_A.fill_(300.0)
        model[0].lora_B.fill_(300.0)
    refused(model, ValueError, "0 is not finite", ll.merge, model)


def test_merge_with_nothing_attached():
    model = tiny.TinyLM()
    refused(model, ValueError, "nothing to merge", ll.merge, model)


def test_merge_into_quantized_layer_says_what_to_do():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False)).to("cpu")
    ll.attach(model, ll.LoRAConfig(r=2, target_roles=()))
    perturb(model)
    err = refused(model, TypeError, "quantized layer 1", ll.merge, model)
    assert "float" in str(err) and "ll.load" in str(err)


# --- variant-specific fields ------------------------------------------------------------------------

@pytest.mark.parametrize("name,field,value", [
    ("gralora", "k", 0), ("gralora", "k", 2.0), ("gralora", "hybrid_r", -1),
    ("singlora", "ramp_up_steps", -1), ("singlora", "ramp_up_steps", 1.5),
    ("pissa", "niter", -1), ("pissa", "niter", 1.5),
    ("delora", "lambda0", "15"), ("delora", "lambda0", float("nan")),
])
def test_bad_variant_fields(name, field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        tiny.cfg_for(name, **{field: value})


def test_negative_step_is_refused():
    model = tiny.TinyLM()
    ll.attach(model, tiny.cfg_for("singlora"))
    refused(model, ValueError, "step must be >= 0", ll.set_step, model, -1)
    for bad in (2.5, "3", None):
        refused(model, TypeError, "step must be an int", ll.set_step, model, bad)


# --- a real transformers model (Conv1D layers, an input-embedding hook) ------------------------------

def gpt2(n_embd=16):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=2, n_head=2, vocab_size=50, n_positions=16)).eval()


def test_failures_on_a_transformers_model(tmp_path, monkeypatch):
    """attach also hooks the input embedding (for gradient checkpointing): a group_init that fails after
    everything was attached, and a load that does not fit, leave no hook and no tensor behind."""
    model = gpt2()
    refused(model, ValueError, "'c_atn'", ll.attach, model, ll.LoRAConfig(target_names=("c_atn",)))

    def group_init(model, targets, cfg, calibration_data):
        assert ll.adapted_layers(model) and model.transformer.wte._forward_hooks  # everything was in place
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(ll.REGISTRY["lora"], "group_init", staticmethod(group_init), raising=False)
    refused(model, RuntimeError, "calibration failed", ll.attach, model, ll.LoRAConfig(r=2))
    monkeypatch.undo()

    wide = gpt2(n_embd=32)
    ll.attach(wide, ll.LoRAConfig(r=2))
    ll.save(wide, tmp_path / "wide.safetensors")
    err = refused(model, ValueError, "wrong shapes", ll.load, model, tmp_path / "wide.safetensors")
    assert "transformer.h.0.attn.c_attn.lora_A: file (2, 32) vs model (2, 16)" in str(err)
