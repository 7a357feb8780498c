"""Adapters on bitsandbytes bases, on the CPU, with real bnb layers (no mocks).

bitsandbytes 0.50.2 quantizes a Linear4bit (nf4, fp4) or Linear8bitLt layer when it
is moved to a device, `.to("cpu")` included, and runs forward and backward there.
Every registered variant is checked on every storage: identity at t=0, gradients
only on the adapter, save/load exact, detach leaving the packed weights and the
quant state bit-identical, init reading the dequantized weight, merge refused with
the float route that replaces it. Tests marked `matrix` feed the README's support
matrix (scripts/support_matrix.py); their ids carry the variant and the column.
"""
from __future__ import annotations

import warnings

import bitsandbytes as bnb
import pytest
import tiny
import torch
import transformers
from tiny import bnb_linear, lifecycle, logits, quantize, storage, train
from torch import nn

import lora_lite as ll
from lora_lite import weights

QUANTS = ("nf4", "fp4", "int8")


# --- weights.py on bitsandbytes layers ---------------------------------------------------------------------------

def bnb_dequantized(layer: nn.Module) -> torch.Tensor:
    """W as bitsandbytes itself applies it: the layer's output on the identity, minus the bias. (d_out, d_in)"""
    with torch.no_grad():
        return (layer(torch.eye(layer.in_features)) - layer.bias).t()


@pytest.mark.parametrize("quant", QUANTS)
def test_dense_weight_is_what_bitsandbytes_computes(quant):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = bnb_linear(lin, quant)
    assert weights.is_linear_like(q) and weights.is_quantized(q) and weights.dims(q) == (64, 48)
    assert not weights.is_quantized(lin)
    if quant == "int8":
        assert q.weight.SCB is not None and q.state.SCB is None  # before the first forward
        assert set(weights.storage(q)) == {"weight", "SCB", "bias"}
    else:
        assert q.weight.shape == (64 * 48 // 2, 1) and q.weight.quant_state.quant_type == quant  # packed
        assert set(weights.storage(q)) == {"weight", "absmax", "code", "shape", "offset", "absmax2", "code2", "bias"}
    W = weights.dense_weight(q)  # read before any forward
    assert W.shape == (48, 64) and W.dtype == torch.float32
    err = (W - lin.weight).abs().max().item()
    assert 0 < err < 0.05  # really quantized, not the float weight
    torch.testing.assert_close(W, bnb_dequantized(q), rtol=0, atol=1e-6)
    if quant == "int8":
        assert q.weight.SCB is None and q.state.SCB is not None  # the forward moved the scales
    assert torch.equal(weights.dense_weight(q), W)  # and after it


@pytest.mark.parametrize("quant", ("nf4", "fp4"))
@pytest.mark.parametrize("nested", (True, False))
def test_dense_weight_after_the_cpu_repack(quant, nested):
    """On AVX512-BF16 CPUs bitsandbytes 0.50.2 repacks a Linear4bit in place at its first forward in eval mode
    without gradients: another nibble order, absmax in bf16 (d_in/64, d_out), nested state dropped; the layer
    then computes in bf16. dense_weight must read that layout: it differs from the weight before the repack
    only by the bf16 rounding of absmax, and matches the layer's bf16 output on the identity."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)  # the repack needs d_out % 32 == 0 and d_in >= 64 (it crashes below: a bnb bug)
    q = bnb_linear(lin, quant)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant,
                                 compress_statistics=nested).to("cpu")
    W0 = weights.dense_weight(q)
    q.eval()
    y = bnb_dequantized(q)
    repacked = weights.is_cpu_repacked(q)
    assert repacked == q.support_avx512bf16_for_cpu  # bitsandbytes' own test of the CPU feature
    W1 = weights.dense_weight(q)
    assert W1.shape == (64, 128) and weights.is_quantized(q) and weights.dims(q) == (128, 64)
    torch.testing.assert_close(W1, W0, rtol=2 ** -8, atol=0)
    torch.testing.assert_close(W1, y, rtol=2 ** -7, atol=1e-7)
    if repacked:
        assert q.weight.shape == (64, 64) and q.weight.quant_state.absmax.dtype == torch.bfloat16


def test_no_input_gradient_through_a_cpu_repacked_layer():
    """Why the models here stay in train mode: after the repack, bitsandbytes 0.50.2 drops the gradient to the
    layer's input (its CPU kernel has no backward), so adapters before the layer would get wrong gradients.
    A canary for docs/quantized.md: it fails when bitsandbytes changes this."""
    q = bnb_linear(nn.Linear(128, 64, bias=False), "nf4").eval()
    with torch.no_grad():
        q(torch.randn(2, 128))
    x = torch.randn(3, 128, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "an autograd kernel was not registered"
        q(x).sum().backward()
    assert (x.grad is None) == weights.is_cpu_repacked(q) == q.support_avx512bf16_for_cpu


def test_4bit_default_quant_type_is_fp4():
    # a Linear4bit built without quant_type stores fp4, not nf4
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32).to("cpu")
    assert q.weight.quant_state.quant_type == "fp4" and weights.dense_weight(q).shape == (32, 64)


# --- every variant on every storage ------------------------------------------------------------------------------

@pytest.mark.matrix
@pytest.mark.parametrize("quant", ("fp32",) + QUANTS)
def test_lifecycle(variant_name, quant, tmp_path):
    model = quantize(tiny.TinyLM(), quant)
    assert weights.is_quantized(model.layers[0].q_proj) == (quant != "fp32")
    lifecycle(model, tiny.cfg_for(variant_name), tiny.tokens(), tmp_path / "a.safetensors")


@pytest.mark.matrix
@pytest.mark.parametrize("quant", QUANTS)
def test_init_reads_the_dequantized_weight(variant_name, quant):
    """Attached before any forward (int8 scales still on the weight), the adapter is initialised exactly as
    on a float model holding the dequantized weights: PiSSA's SVD, DeLoRA's norms read W through weights.py."""
    q = quantize(tiny.TinyLM(), quant)
    f = tiny.TinyLM()
    with torch.no_grad():
        for name, m in q.named_modules():
            if weights.is_linear_like(m) and weights.is_quantized(m):
                f.get_submodule(name).weight.copy_(weights.dense_weight(m))
    cfg = tiny.cfg_for(variant_name)
    for model in (q, f):
        torch.manual_seed(0)
        ll.attach(model, cfg)
    qt, ft = tiny.lora_tensors(q), tiny.lora_tensors(f)
    assert qt.keys() == ft.keys() and qt
    for k in qt:
        torch.testing.assert_close(qt[k], ft[k], rtol=1e-6, atol=1e-6, msg=k)
    if variant_name == "delora":
        for _, layer in ll.adapted_layers(q):
            torch.testing.assert_close(layer.lora_wnorm, weights.dense_weight(layer).norm(dim=0))


@pytest.mark.matrix
@pytest.mark.parametrize("quant", QUANTS)
def test_merge_on_a_quantized_base_is_refused(variant_name, quant):
    model = quantize(tiny.TinyLM(), quant)
    ids = tiny.tokens()
    ll.attach(model, tiny.cfg_for(variant_name))
    train(model, ids, steps=2)
    with torch.no_grad():
        y = logits(model, ids)
    before = storage(model) | {k: v.clone() for k, v in tiny.lora_tensors(model).items()}
    with pytest.raises(TypeError, match=r"quantized layer .*load the base model in float.*ll\.load.*ll\.merge"):
        ll.merge(model)
    assert ll.adapted_layers(model)  # still attached
    after = storage(model) | tiny.lora_tensors(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(logits(model, ids), y)


@pytest.mark.matrix
@pytest.mark.parametrize("quant", QUANTS)
def test_train_quantized_merge_in_float(variant_name, quant, tmp_path):
    """The merge route: train on the quantized base, save, ll.load into the float base, ll.merge. The merged
    float model differs from the hooked quantized one by the base's quantization error, no more."""
    ids = tiny.tokens()
    f, q = tiny.TinyLM(), quantize(tiny.TinyLM(), quant)
    with torch.no_grad():
        y_float, y_quant = logits(f, ids), logits(q, ids)
    base_err = (y_float - y_quant).abs().max().item()
    assert base_err > 0
    ll.attach(q, tiny.cfg_for(variant_name))
    train(q, ids, steps=5, lr=5e-3)  # a modest update: a heavily trained net amplifies any weight error more
    with torch.no_grad():
        y_hooked = logits(q, ids)
    ll.save(q, tmp_path / "a.safetensors")
    ll.load(f, tmp_path / "a.safetensors")
    with torch.no_grad():
        y_float_hooked = logits(f, ids)
    ll.merge(f)
    assert not ll.adapted_layers(f)
    with torch.no_grad():
        y_merged = logits(f, ids)
    torch.testing.assert_close(y_merged, y_float_hooked, rtol=0, atol=1e-5)
    err = (y_merged - y_hooked).abs().max().item()
    assert err <= 2 * base_err + 1e-5, (err, base_err)
    assert (y_merged - y_float).abs().max().item() > base_err  # the adapter's effect is larger than the noise


# --- transformers' own loading path: from_pretrained(quantization_config=BitsAndBytesConfig(...)) -----------------

BNB_CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    cfg = transformers.Qwen3Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3")
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.mark.matrix
@pytest.mark.parametrize("quant", QUANTS)
def test_transformers_bitsandbytes_config(variant_name, quant, qwen3_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        qwen3_dir, quantization_config=transformers.BitsAndBytesConfig(**BNB_CONFIGS[quant]), device_map="cpu")
    model.train()  # from_pretrained returns eval mode, where a no-grad forward repacks 4-bit weights (see above)
    proj = model.model.layers[0].self_attn.q_proj
    assert type(proj) is (bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit)
    assert weights.is_quantized(proj) and weights.dense_weight(proj).shape == (32, 32)
    lifecycle(model, tiny.cfg_for(variant_name), tiny.tokens(), tmp_path / "a.safetensors")


def test_attach_holds_the_cpu_repack_off():
    """While an adapter is attached, an eval-mode no-grad forward must not repack a 4-bit layer (which would cut
    the gradient path of later training); detach gives bitsandbytes its switch back."""
    model = nn.Sequential(bnb_linear(nn.Linear(128, 64, bias=False), "nf4"))
    switch = model[0].support_avx512bf16_for_cpu
    ll.attach(model, ll.LoRAConfig(r=4, target_roles=()))
    assert model[0].support_avx512bf16_for_cpu is False
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 128))
    assert not weights.is_cpu_repacked(model[0])
    model.train()
    x = torch.randn(3, 128, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model[0].lora_B.grad.abs().sum() > 0
    ll.detach(model)
    assert model[0].support_avx512bf16_for_cpu == switch


def test_attach_warns_about_an_already_repacked_layer():
    q = bnb_linear(nn.Linear(128, 64, bias=False), "nf4").eval()
    with torch.no_grad():
        q(torch.randn(2, 128))
    model = nn.Sequential(q)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ll.attach(model, ll.LoRAConfig(r=4, target_roles=()))
    warned = any("repacked" in str(w.message) for w in caught)
    assert warned == weights.is_cpu_repacked(q)
    ll.detach(model)
