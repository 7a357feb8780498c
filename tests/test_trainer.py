"""transformers Trainer with a hooked model: it trains the adapter only; AdapterCallback drives the step, puts
the adapter file (and no base copy) in every checkpoint and resumes exactly; a bitsandbytes 4-bit base trains
through allow_quantized_training.
"""
import pytest
import tiny
import torch
from tiny import VOCAB, llama
from transformers import (
    BitsAndBytesConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import lora_lite as ll
from lora_lite.hf import AdapterCallback, allow_quantized_training
from safetensors import safe_open

IDS = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))
DATA = [{"input_ids": row, "labels": row} for row in IDS]


def trainer(model, tmp_path, steps=4, save_steps=2, accumulate=1, **kw):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=steps,
                             per_device_train_batch_size=4 // accumulate, gradient_accumulation_steps=accumulate,
                             learning_rate=1e-2, save_strategy="steps", save_steps=save_steps, logging_steps=1,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return Trainer(model=model, args=args, train_dataset=DATA, callbacks=[AdapterCallback()], **kw)


def base_tensors(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def test_trainer_trains_adapter_and_callback_saves_it(tmp_path):
    torch.manual_seed(0)
    model = llama()
    ll.attach(model, tiny.cfg_for("lora"))
    base, start = base_tensors(model), {k: v.clone() for k, v in tiny.lora_tensors(model).items()}
    trainer(model, tmp_path).train()

    trained = tiny.lora_tensors(model)
    assert all(not torch.equal(trained[k], start[k]) for k in start if k.endswith("lora_B"))
    assert all(torch.equal(v, base[k]) for k, v in base_tensors(model).items())
    out = tmp_path / "out"
    _, _, last = ll.read(out / "checkpoint-4" / "adapter.safetensors")
    _, _, first = ll.read(out / "checkpoint-2" / "adapter.safetensors")
    assert last.keys() == trained.keys()
    assert all(torch.equal(last[k], trained[k]) for k in trained)
    assert any(not torch.equal(first[k], last[k]) for k in last)

    ll.save(model, tmp_path / "final.safetensors")
    torch.manual_seed(0)
    fresh = llama()
    ll.load(fresh, tmp_path / "final.safetensors")
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-6)


@pytest.fixture
def four_bit(tmp_path):
    torch.manual_seed(0)
    llama().save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")


def test_trainer_on_4bit_base(four_bit, tmp_path):
    model = four_bit
    assert model.is_quantized and type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with pytest.raises(ValueError, match="no lora-lite adapter is attached"):
        with allow_quantized_training(model):
            pass
    ll.attach(model, tiny.cfg_for("lora"))
    with pytest.raises(ValueError, match="purely quantized"):  # transformers' own check, without the route
        trainer(model, tmp_path)

    with allow_quantized_training(model):
        run = trainer(model, tmp_path, steps=2)
    assert "_hf_peft_config_loaded" not in vars(model) and not model._hf_peft_config_loaded
    packed = base_tensors(model)
    start = {k: v.clone() for k, v in tiny.lora_tensors(model).items()}
    run.train()
    trained = tiny.lora_tensors(model)
    assert all(not torch.equal(trained[k], start[k]) for k in start if k.endswith("lora_B"))
    assert all(torch.equal(v, packed[k]) for k, v in base_tensors(model).items())
    _, _, saved = ll.read(tmp_path / "out" / "checkpoint-2" / "adapter.safetensors")
    assert all(torch.equal(saved[k], trained[k]) for k in trained)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def losses(run):
    return [h["loss"] for h in run.state.log_history if "loss" in h]


def steps(model):
    return {int(v) for k, v in tiny.lora_tensors(model).items() if k.endswith("lora_step")}


@pytest.mark.parametrize("name", sorted(ll.REGISTRY))
def test_plain_trainer_trains_every_variant(name, tmp_path):
    torch.manual_seed(0)
    model = llama()
    ll.attach(model, tiny.cfg_for(name))
    start = {k: v.clone() for k, v in tiny.lora_tensors(model).items()}
    run = trainer(model, tmp_path, steps=4, save_steps=10, accumulate=2)
    run.train()
    assert run.state.global_step == 4
    norms = [h["grad_norm"] for h in run.state.log_history if "grad_norm" in h]
    assert len(norms) == 4 and all(n > 0 for n in norms[1:])  # SingLoRA's step 0 has u(0) = 0: no gradient
    trained = tiny.lora_tensors(model)
    moved = [k for k, p in model.named_parameters() if p.requires_grad and not torch.equal(trained[k], start[k])]
    assert moved == [k for k, p in model.named_parameters() if p.requires_grad]
    if name == "singlora":  # the step counts optimizer steps (4), not micro-batches (8)
        assert steps(model) == {4}


def test_checkpoint_holds_adapter_and_state_but_no_base(tmp_path):
    torch.manual_seed(0)
    model = llama()
    ll.attach(model, tiny.cfg_for("singlora"))
    base, ignored = set(base_tensors(model)), set(model._keys_to_ignore_on_save)
    trainer(model, tmp_path, steps=2).train()
    folder = tmp_path / "out" / "checkpoint-2"
    files = {f.name for f in folder.iterdir()}
    assert {"adapter.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            assert not base & set(st.keys()), f.name
    assert model._keys_to_ignore_on_save == ignored  # restored at train end: save_pretrained writes it all again


def test_callback_refuses_a_bare_model(tmp_path):
    torch.manual_seed(0)
    model = llama()
    snap = tiny.snapshot(model)
    with pytest.raises(ValueError, match="AdapterCallback: no lora-lite adapter is attached"):
        trainer(model, tmp_path, steps=1).train()
    tiny.assert_unchanged(model, snap)


@pytest.mark.parametrize("name", ["lora", "singlora"])
def test_resume_continues_exactly(name, tmp_path):
    def fresh():
        torch.manual_seed(0)
        model = llama()
        ll.attach(model, tiny.cfg_for(name))
        return model

    whole = trainer(fresh(), tmp_path / "a", steps=6, save_steps=3)
    whole.train()
    first = trainer(fresh(), tmp_path / "b", steps=6, save_steps=3)
    first.add_callback(StopAt(3))  # the same schedule (lr decaying over 6 steps), interrupted after 3
    first.train()
    assert first.state.global_step == 3
    model = fresh()
    rest = trainer(model, tmp_path / "b", steps=6, save_steps=3)
    rest.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))
    assert len(losses(whole)) == 6 and losses(rest)[:3] == losses(first)  # the resumed log starts with the first 3
    assert torch.allclose(torch.tensor(losses(rest)), torch.tensor(losses(whole)), rtol=1e-6, atol=0)
    want, got = tiny.lora_tensors(whole.model), tiny.lora_tensors(model)
    assert all(torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-7) for k in want)
    if name == "singlora":
        assert steps(model) == {6}
