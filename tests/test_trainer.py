"""transformers Trainer with a hooked model: it trains the adapter only, SaveAdapterCallback puts the
adapter file in every checkpoint, and a bitsandbytes 4-bit base trains through allow_quantized_training.
"""
import pytest
import tiny
import torch
from tiny import VOCAB, llama
from transformers import (
    BitsAndBytesConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

import lora_lite as ll
from lora_lite.hf import SaveAdapterCallback, allow_quantized_training

IDS = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))
DATA = [{"input_ids": row, "labels": row} for row in IDS]


def trainer(model, tmp_path, steps=4, **kw):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=steps,
                             per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="steps",
                             save_steps=2, logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=DATA, callbacks=[SaveAdapterCallback()], **kw)


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
