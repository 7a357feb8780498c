"""Support-matrix cells beyond the storage columns of test_quantized.py: merge into float nn.Linear weights,
and GPT-2, whose transformers Conv1D layers store W transposed. Read by scripts/support_matrix.py."""
from __future__ import annotations

import pytest
import tiny
import torch
import transformers
from tiny import lifecycle, logits, train

import lora_lite as ll
from lora_lite import weights


def merged_matches_hooked(model, cfg, ids) -> None:
    """Train a little, merge: the float model computes what the hooked one did, with no adapter left."""
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    ll.attach(model, cfg)
    train(model, ids, steps=3)
    y = logits(model, ids).detach()
    ll.merge(model)
    assert not ll.adapted_layers(model) and not tiny.lora_tensors(model)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), y, rtol=0, atol=1e-5)
    assert any(not torch.equal(base[n], p) for n, p in model.named_parameters())


@pytest.mark.matrix
def test_merge(variant_name):
    merged_matches_hooked(tiny.TinyLM(), tiny.cfg_for(variant_name), tiny.tokens())


def gpt2() -> transformers.GPT2LMHeadModel:
    cfg = transformers.GPT2Config(vocab_size=48, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.matrix
def test_conv1d(variant_name, tmp_path):
    cfg, ids = tiny.cfg_for(variant_name), tiny.tokens()
    model = gpt2()
    with ll.attached(model, cfg) as handle:  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj in each block
        assert len(handle.targets) == 8 and all(weights.is_conv1d(t.layer) for t in handle.targets)
    lifecycle(model, cfg, ids, tmp_path / "a.safetensors")
    merged_matches_hooked(model, cfg, ids)
