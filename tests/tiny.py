"""Small models and configs shared by the tests (no download, a few thousand parameters)."""
from __future__ import annotations

import torch
from torch import nn

import lora_lite as ll

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


def perturb(model, seed=0):
    """Move every float adapter tensor away from its init (e.g. LoRA's B = 0), past any ramp-up."""
    ll.set_step(model, 10**6)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora_tensors(model).values():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_restored(model, snap):
    """Every base tensor bit for bit, every requires_grad flag, and no adapter leftovers."""
    state, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"base tensors changed: {changed}"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for name, m in model.named_modules():
        leftovers = [k for store in (m.__dict__, m._parameters, m._buffers) for k in store if k.startswith("lora_")]
        assert not leftovers, f"{name or 'root'} keeps {leftovers}"
        assert not m._forward_hooks and not m._forward_pre_hooks, f"{name or 'root'} keeps hooks"
    assert ll.adapted_layers(model) == []
