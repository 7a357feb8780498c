"""Small models and configs shared by the tests (no download, a few thousand parameters)."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

import lora_lite as ll
from lora_lite import weights
from lora_lite.config import CONFIGS
from lora_lite.calibration import capture_inputs
from lora_lite.variant import ParamSpec, zeros
from lora_lite.variants.lora import LoRA, LoRAConfig

# Per-variant settings that make the contract meaningful on tiny models: SingLoRA's ramp must
# finish within a short training probe, and its s·A Aᵀ (entries of A up to 1/sqrt(r)) at s = 2
# swamps a 32-wide base, so it gets s = 1/4; GraLoRA's k must divide every width used here.
# DeLoRA's lambda0 = 15 is sized for widths in the thousands (‖ΔW‖/‖W‖ ≈ λ/√(r·d_in) after one step):
# at d = 32 it is 1.4 and outputs reach 16, past what fp32 merge-vs-hook (PEFT's too) holds to 1e-5.
OVERRIDES = {"singlora": {"ramp_up_steps": 10, "alpha": 1.0}, "gralora": {"k": 2}, "delora": {"lambda0": 2.0}}


def cfg_for(name: str, **kw) -> ll.AdapterConfig:
    """The registered variant's config with test-friendly defaults (r=4, alpha=8), overridable."""
    cls = ll.REGISTRY[name].config
    fields = cls.__dataclass_fields__
    args = {"r": 4, "alpha": 8.0, **{k: v for k, v in OVERRIDES.get(name, {}).items() if k in fields}, **kw}
    return cls(**args)


class Block(nn.Module):
    """Llama-shaped: q/k/v/o square, gate/up readers, down writer."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(d, f), nn.Linear(d, f)
        self.down_proj = nn.Linear(f, d)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.o_proj(att @ v)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyLM(nn.Module):
    """Token ids (batch, seq) -> logits (batch, seq, vocab). No `config` attribute: roles are inferred."""

    def __init__(self, vocab: int = 48, d: int = 32, f: int = 64, n_layers: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, f) for _ in range(n_layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


def tokens(batch: int = 4, seq: int = 12, vocab: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1].startswith("lora_")}


def perturb(model, seed=0, scale=0.1):
    """Move every trainable adapter tensor away from its init (e.g. LoRA's B = 0), past any ramp-up. Frozen
    buffers (DeLoRA's norms, PiSSA's initial factors) keep what init read from W, as training keeps them."""
    ll.set_step(model, 10**6)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("lora_") and t.requires_grad:
                t.add_(scale * torch.randn(t.shape, generator=g))


def snapshot(model: nn.Module) -> dict:
    """Tensors, buffer names, requires_grad flags, hooks, lora_* attributes and adapted layers of every module."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "buffers": sorted(n for n, _ in model.named_buffers()),
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: [list(d.items()) for d in (m._forward_hooks, m._forward_pre_hooks,
                                                m._forward_hooks_with_kwargs, m._forward_pre_hooks_with_kwargs)]
                  for n, m in model.named_modules()},
        "attrs": {n: sorted(k for k in m.__dict__ if k.startswith("lora_")) for n, m in model.named_modules()},
        "adapted": [n for n, _ in ll.adapted_layers(model)],
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, except that NaN equals NaN (merge tests plant NaNs on purpose) and meta tensors (no
    values) are the same when their shape and dtype are."""
    if a.shape != b.shape or a.dtype != b.dtype or a.is_meta != b.is_meta:
        return False
    if a.is_meta:
        return True
    if a.is_floating_point():
        return bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())
    return torch.equal(a, b)


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """Everything `snapshot` holds is as it was: the model may carry an adapter, if it did before."""
    now = snapshot(model)
    assert now["tensors"].keys() == before["tensors"].keys(), \
        f"state_dict keys changed: +{now['tensors'].keys() - before['tensors'].keys()} " \
        f"-{before['tensors'].keys() - now['tensors'].keys()}"
    changed = [k for k, v in before["tensors"].items() if not _same(now["tensors"][k], v)]
    assert not changed, f"tensors changed: {changed}"
    for part in ("buffers", "grad", "hooks", "attrs", "adapted"):
        assert now[part] == before[part], f"{part} changed"


def assert_restored(model, snap):
    """Unchanged since a snapshot of the bare model: every base tensor bit for bit, every requires_grad flag,
    and no adapter leftover (lora_* names in any store, hooks)."""
    assert_unchanged(model, snap)
    for name, m in model.named_modules():
        leftovers = [k for store in (m.__dict__, m._parameters, m._buffers) for k in store if k.startswith("lora_")]
        assert not leftovers, f"{name or 'root'} keeps {leftovers}"


def refused(model, exc, match, fn, *args, **kw):
    """Run fn(*args), expect `exc` matching `match`, and `model` exactly as it was before the call."""
    snap = snapshot(model)
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kw)
    assert_unchanged(model, snap)
    return info.value


# --- adapter files, read and edited raw ------------------------------------------------------------------------

def raw(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def rewrite(path, out, edit_tensors=None, edit_config=None, metadata=None):
    """Copy an adapter file with its tensors, config dict or whole metadata edited."""
    tensors, meta = raw(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        cfg = json.loads(meta["config"])
        edit_config(cfg)
        meta["config"] = json.dumps(cfg)
    if metadata is not None:
        meta = metadata(meta)
    save_file(tensors, str(out), metadata=meta)
    return out


# --- transformers architectures, tiny, from their configs (offline, random weights) ---------------------------

VOCAB = 64


D = 32  # hidden width; k/v heads give 16, MLPs 64 or 128: every width divisible by GraLoRA's k (2 or 4)


def qwen3():
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16))


def llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16))


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def vit():
    """An image classifier: a ViT encoder and a fresh 5-way `classifier` head."""
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=32, patch_size=16, num_labels=5)).eval()


def bert():
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=2 * D, max_position_embeddings=32))


# --- bitsandbytes bases and the adapter lifecycle on any storage ----------------------------------------------

def bnb_linear(lin: nn.Linear, quant: str) -> nn.Module:
    """A bitsandbytes copy of `lin`, quantized: the `.to("cpu")` is what quantizes."""
    if quant == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:  # compress_statistics (double quantization) is the Params4bit default: the nested state is covered too
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type=quant)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone())
    return q.to("cpu")


def quantize(model: nn.Module, quant: str) -> nn.Module:
    """Replace every nn.Linear but lm_head with its bitsandbytes copy, in place; "fp32" leaves the model float."""
    if quant == "fp32":
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                setattr(parent, name, bnb_linear(child, quant))
    return model


def storage(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every base tensor: the state_dict, and what bitsandbytes keeps off it (weights.storage)."""
    out = {n: t.detach().clone() for n, t in model.state_dict().items() if ".lora_" not in f".{n}"}
    for name, m in model.named_modules():
        if weights.is_linear_like(m):
            out |= {f"{name}:{k}": v.clone() for k, v in weights.storage(m).items()}
    return out


def assert_same_storage(before: dict, model: nn.Module) -> None:
    after = storage(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"base tensors changed: {changed}"


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return getattr(out, "logits", out)  # transformers returns an output object


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    z = logits(model, ids)
    return F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1))


def train(model: nn.Module, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ll.track_steps(opt, model)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def lifecycle(model: nn.Module, cfg: ll.AdapterConfig, ids: torch.Tensor, path) -> None:
    """The adapter contract on one model, whatever stores its weights. The models here have no dropout and
    stay in train mode: see test_dense_weight_after_the_cpu_repack for what eval mode does to 4-bit layers."""
    with torch.no_grad():
        y0 = logits(model, ids)  # for int8 this first forward moves SCB from the weight to layer.state
    before = storage(model)
    ll.attach(model, cfg)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), y0, rtol=0, atol=1e-6 * y0.abs().max().item())

    train(model, ids, steps=3)  # B (and SingLoRA's ramp) leave 0 after the first step: every gradient is live
    for n, p in model.named_parameters():
        if ".lora_" in f".{n}" and p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, f"base tensor {n} has a gradient"

    with torch.no_grad():
        y1 = logits(model, ids)
    assert not torch.equal(y1, y0)
    ll.save(model, path)
    ll.detach(model)
    assert_same_storage(before, model)
    with torch.no_grad():
        assert torch.equal(logits(model, ids), y0)
    ll.load(model, path)
    with torch.no_grad():
        assert torch.equal(logits(model, ids), y1)
    ll.detach(model)
    assert_same_storage(before, model)


# --- a calibration variant registered only inside tests -------------------------------------------------------

@contextlib.contextmanager
def registered(cls):
    """Register a test-only variant for the duration of a test, so it never leaks into parametrization."""
    ll.register(cls)
    try:
        yield cls
    finally:
        ll.REGISTRY.pop(cls.name, None)
        CONFIGS.pop(cls.name, None)


@dataclass
class PCAConfig(LoRAConfig):
    pass


def input_grams(model, targets, data, fn=None):
    """{layer: Σ xᵀx over every token of the calibration batches}."""
    grams = {}

    def collect(layer, x):
        x = x.reshape(-1, x.shape[-1]).float()
        grams[layer] = grams.get(layer, 0) + x.t() @ x
        if fn is not None:
            fn(layer, x)

    capture_inputs(model, [t.layer for t in targets], data, collect)
    return grams


class PCA(ll.Variant):
    name = "test_pca"
    config = PCAConfig
    calls = []  # (target names, calibration data) of every group_init call

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), None), "lora_B": ParamSpec((d_out, cfg.r), zeros)}

    @staticmethod
    def group_init(model, targets, cfg, calibration_data):
        if calibration_data is None:
            raise ValueError("test_pca needs calibration_data")
        PCA.calls.append(([t.name for t in targets], calibration_data))
        grams = input_grams(model, targets, calibration_data)
        with torch.no_grad():
            for t in targets:
                _, vectors = torch.linalg.eigh(grams[t.layer])  # ascending eigenvalues
                t.layer.lora_A.copy_(vectors[:, -cfg.r:].flip(1).t())

    forward = LoRA.forward
    lora_factors = LoRA.lora_factors  # which also gives delta_weight (merge)


def calibration():
    return [tokens(batch=2, seed=s) for s in (10, 11)]
