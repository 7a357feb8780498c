"""modules_to_save: whole modules trained beside the adapter, saved by full key, restored on detach, kept by
merge; tied or overlapping modules refused."""
import pytest
import tiny
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import vit

import lora_lite as ll

PIXELS = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 2, 3])
IDS = tiny.tokens(vocab=tiny.VOCAB)


def llama():
    torch.manual_seed(0)  # the same base every call: a reload goes onto a fresh copy
    return tiny.llama()


def train_classifier(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(pixel_values=PIXELS).logits, LABELS).backward()
        opt.step()


def test_vit_head_survives_save_detach_load(tmp_path):
    model = vit()
    bare = tiny.snapshot(model)
    ll.attach(model, ll.LoRAConfig(r=4, modules_to_save=("classifier",)))
    assert "trained whole (modules_to_save): classifier, 165 params" in ll.summary(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(".lora_" in n or n.startswith("classifier.") for n in trainable)
    train_classifier(model)
    head = model.classifier.weight.detach().clone()
    assert not torch.equal(head, bare["tensors"]["classifier.weight"])
    with torch.no_grad():
        trained = model(pixel_values=PIXELS).logits
    ll.save(model, tmp_path / "a.safetensors")
    tensors, _ = tiny.raw(tmp_path / "a.safetensors")
    assert torch.equal(tensors["classifier.weight"], head)

    ll.detach(model)
    tiny.assert_restored(model, bare)  # the original head, bit for bit
    fresh = vit()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert fresh.classifier.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(fresh(pixel_values=PIXELS).logits, trained)


@pytest.mark.parametrize("name", sorted(ll.REGISTRY))
def test_every_variant_round_trips_a_trained_lm_head(name, tmp_path):
    model = llama()
    ll.attach(model, tiny.cfg_for(name, modules_to_save=("lm_head",)))
    tiny.train(model, IDS, steps=2)
    want = tiny.logits(model, IDS).detach()
    ll.save(model, tmp_path / "a.safetensors")
    fresh = llama()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(tiny.logits(fresh, IDS), want)


def test_merge_keeps_the_trained_module(tmp_path):
    model = vit()
    ll.attach(model, ll.LoRAConfig(r=4, modules_to_save=("classifier",)))
    train_classifier(model)
    head = model.classifier.weight.detach().clone()
    with torch.no_grad():
        hooked = model(pixel_values=PIXELS).logits
    ll.merge(model)
    assert torch.equal(model.classifier.weight, head)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=PIXELS).logits, hooked, atol=1e-5)


def test_tied_lm_head_is_refused():
    model = tiny.gpt2()  # lm_head shares the token embedding's weight
    tiny.refused(model, ValueError, "tied to transformer.wte.weight", ll.attach, model,
                 ll.LoRAConfig(r=4, modules_to_save=("lm_head",)))


@pytest.mark.parametrize("entry, match", [("classifer", "matches no module"),
                                          ("vit.layers.0", "holds adapted layers")])
def test_bad_entries_are_refused(entry, match):
    model = vit()
    tiny.refused(model, ValueError, match, ll.attach, model, ll.LoRAConfig(r=4, modules_to_save=(entry,)))


def test_a_norm_trains_whole_and_detach_restores_it():
    model = llama()
    bare = tiny.snapshot(model)
    ll.attach(model, ll.LoRAConfig(r=4, modules_to_save=("model.norm",)))
    tiny.train(model, IDS, steps=2)
    assert not torch.equal(model.model.norm.weight, bare["tensors"]["model.norm.weight"])
    ll.detach(model)
    tiny.assert_restored(model, bare)


def save_head(tmp_path):
    model = vit()
    ll.attach(model, ll.LoRAConfig(r=4, modules_to_save=("classifier",)))
    train_classifier(model, steps=1)
    ll.save(model, tmp_path / "a.safetensors")
    return model


def test_file_values_of_the_module_are_checked(tmp_path):
    save_head(tmp_path)
    nan = tiny.rewrite(tmp_path / "a.safetensors", tmp_path / "nan.safetensors",
                       edit_tensors=lambda t: t["classifier.weight"].fill_(float("nan")))
    gone = tiny.rewrite(tmp_path / "a.safetensors", tmp_path / "gone.safetensors",
                        edit_tensors=lambda t: t.pop("classifier.bias"))
    fresh = vit()
    tiny.refused(fresh, ValueError, "non-finite modules_to_save values: classifier.weight", ll.load, fresh, nan)
    tiny.refused(fresh, ValueError, "missing modules_to_save keys: classifier.bias", ll.load, fresh, gone)


def test_swap_carries_module_values(tmp_path):
    donor = save_head(tmp_path)
    model = vit()
    ll.attach(model, ll.LoRAConfig(r=4, modules_to_save=("classifier",)))
    weight = model.classifier.weight
    ll.swap(model, tmp_path / "a.safetensors")
    assert model.classifier.weight is weight and torch.equal(weight, donor.classifier.weight)


def test_disabled_gives_the_original_module_and_training_goes_on():
    model = vit()
    with torch.no_grad():
        base = model(pixel_values=PIXELS).logits
    ll.attach(model, ll.LoRAConfig(r=4, modules_to_save=("classifier",)))
    train_classifier(model, steps=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    policy = F.cross_entropy(model(pixel_values=PIXELS).logits, LABELS)  # its graph holds the trained head
    with ll.disabled(model), ll.disabled(model):
        assert torch.equal(model(pixel_values=PIXELS).logits, base)
    head = model.classifier.weight.detach().clone()
    policy.backward()
    opt.step()
    assert not torch.equal(model.classifier.weight, head)
    with ll.disabled(model):
        ll.detach(model)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=PIXELS).logits, base)


@pytest.mark.parametrize("form", ["native", "lora"])
def test_peft_export_carries_the_head(form, tmp_path):
    model = vit()
    ll.attach(model, ll.LoRAConfig(r=4, modules_to_save=("classifier",)))
    train_classifier(model)
    with torch.no_grad():
        want = model(pixel_values=PIXELS).logits
    ll.export_peft(model, tmp_path / "peft", form=form)
    theirs = PeftModel.from_pretrained(vit(), tmp_path / "peft")
    fresh = vit()
    ll.load(fresh, tmp_path / "peft")
    assert fresh.classifier.weight.requires_grad
    with torch.no_grad():
        assert torch.allclose(theirs(pixel_values=PIXELS).logits, want, atol=1e-5)
        assert torch.allclose(fresh(pixel_values=PIXELS).logits, want, atol=1e-6)


def test_a_peft_made_head_imports_exactly(tmp_path):
    peft = get_peft_model(vit(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]))
    train_classifier(peft, steps=2)
    peft.save_pretrained(tmp_path / "peft")
    peft.eval()
    fresh = vit()
    ll.load(fresh, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(fresh(pixel_values=PIXELS).logits, peft(pixel_values=PIXELS).logits, atol=1e-6)
