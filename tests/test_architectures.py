"""Every registered variant on real transformers architectures, each built tiny from its config (offline).

Qwen3 and Llama (nn.Linear, q/k/v/o + gated MLP), GPT-2 (transformers Conv1D, weight stored transposed; fused
c_attn) and BERT (an encoder: query/key/value/dense, where `dense` is both a reader and a writer by name).
Each model has 2 layers and the adapter goes on layer 0 only, so layer selection is checked on every naming
scheme (`layers.N`, `h.N`, `layer.N`).
"""
from __future__ import annotations

import pytest
import tiny
import torch
from tiny import VOCAB, D, bert, gpt2, llama, qwen3

import lora_lite as ll


def _decoder_roles(prefix):
    attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
    return {f"{attn}.q_proj": "reader", f"{attn}.k_proj": "reader", f"{attn}.v_proj": "reader",
            f"{attn}.o_proj": "writer", f"{mlp}.gate_proj": "reader", f"{mlp}.up_proj": "reader",
            f"{mlp}.down_proj": "writer"}


# (builder, the layer-0 modules the default roles (reader, writer) must select, with their roles)
ARCHS = {
    "qwen3": (qwen3, _decoder_roles("model.layers.0")),
    "llama": (llama, _decoder_roles("model.layers.0")),
    "gpt2": (gpt2, {"transformer.h.0.attn.c_attn": "reader", "transformer.h.0.attn.c_proj": "writer",
                    "transformer.h.0.mlp.c_fc": "reader", "transformer.h.0.mlp.c_proj": "writer"}),
    "bert": (bert, {"bert.encoder.layer.0.attention.self.query": "reader",
                    "bert.encoder.layer.0.attention.self.key": "reader",
                    "bert.encoder.layer.0.attention.self.value": "reader",
                    "bert.encoder.layer.0.attention.output.dense": "writer",
                    "bert.encoder.layer.0.intermediate.dense": "reader",
                    "bert.encoder.layer.0.output.dense": "writer"}),
}


def build(arch):
    torch.manual_seed(0)
    return ARCHS[arch][0]().eval()  # eval: the base's own dropout off, so outputs are comparable


def out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def train(model, ids, steps=5, lr=1e-2):
    """A few AdamW steps on a fixed batch (labels = ids: next-token loss, or reconstruction for BERT)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ll.track_steps(opt, model)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses + [model(input_ids=ids, labels=ids).loss.item()]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_variant_on_architecture(arch, variant_name, tmp_path):
    model = build(arch)
    ids = tiny.tokens(batch=2, seq=10, vocab=VOCAB)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    base = out(model, ids)
    scale = base.abs().max().item()

    handle = ll.attach(model, tiny.cfg_for(variant_name, layers=(0,)))
    assert {t.name: t.role for t in handle.targets} == ARCHS[arch][1]
    assert (out(model, ids) - base).abs().max().item() <= 1e-6 * scale  # identity at t=0

    losses = train(model, ids)
    assert losses[-1] < losses[0], losses
    trained = out(model, ids)
    assert not torch.equal(trained, base)

    path = tmp_path / "adapter.safetensors"
    ll.save(model, path)
    ll.detach(model)
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())  # detach is bit-exact
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(out(model, ids), base)

    ll.load(model, path)
    assert torch.equal(out(model, ids), trained)  # the file alone reproduces the trained model

    ll.merge(model)
    assert not tiny.lora_tensors(model)
    assert (out(model, ids) - trained).abs().max().item() <= 1e-5 * trained.abs().max().item()


def test_gralora_gpt2_c_attn_c_proj_k4():
    """The seed's GraLoRA example: k=4 blocks on GPT-2's Conv1D c_attn (32->96) and c_proj (32->32, 128->32)."""
    model = build("gpt2")
    ids = tiny.tokens(batch=2, seq=10, vocab=VOCAB)
    base = out(model, ids)
    cfg = tiny.cfg_for("gralora", r=8, alpha=16.0, k=4, target_names=(r"\.c_attn$", r"\.c_proj$"))
    handle = ll.attach(model, cfg)
    assert sorted(t.name for t in handle.targets) == sorted(
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj"))
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.lora_A.shape == (4, D // 4, 8) and c_attn.lora_B.shape == (4, 8, 3 * D // 4)
    assert torch.equal(out(model, ids), base)

    losses = train(model, ids)
    assert losses[-1] < losses[0], losses
    hooked = out(model, ids)
    ll.merge(model)
    assert (out(model, ids) - hooked).abs().max().item() <= 1e-5 * hooked.abs().max().item()
