"""The tasks of `just study` (scripts/study.py): data, base models, one training loop, update norms.

Three tasks, all built here, nothing downloaded:

- digits: scikit-learn's bundled 8x8 `load_digits`; a 64-128-10 MLP pretrained on the odd digits, adapted
  to the even ones (PiSSA's MNIST toy, at 8x8). Full-batch AdamW on a fixed half of each class set.
- outliers: one frozen 128x128 linear layer and a known full-rank update ΔW*; inputs are Gaussian with a
  few channels scaled x50-x100 (GraLoRA's outlier channels). The loss is ‖(ΔW - ΔW*) x‖² over ‖ΔW* x‖².
- text: a tiny transformers Qwen3 (byte tokens) pretrained on a word-bigram chain drawn from
  scripts/text.txt, adapted to the same chain with every word spelled backwards (a shifted distribution).

Every adapter is attached with `ll.attach` and trained with AdamW (no weight decay, so only gradients
move it) and `ll.track_steps` (SingLoRA's ramp advances on each optimizer step).
"""
from __future__ import annotations

import copy
import functools
import math
import os
import random
import re

import torch
import torch.nn.functional as F
from torch import nn

import lora_lite as ll

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text.txt")
# DeLoRA: its first step puts ‖ΔW‖ near λ0/√r times the column norms of W, which is a few % of ‖W‖ here;
# the default 15 would make that first step about as large as W itself on these 64-128 wide layers.
LAMBDA0 = 1.0
GRALORA_K = 2  # divides every width here (64, 128, 10) and every rank used


def config(variant: str, r: int, steps: int, **fields) -> ll.AdapterConfig:
    """The study's config: scale 1 (alpha = r), every linear role, SingLoRA's ramp over the first 10%.

    `fields` override; variant-specific ones (k, lambda0, ...) apply only to the variant that has them."""
    cls = ll.REGISTRY[variant].config
    fields = {"lambda0": LAMBDA0, "k": GRALORA_K, "ramp_up_steps": max(steps // 10, 1), **fields}
    specific = {k: v for k, v in fields.items() if k in cls.__dataclass_fields__}
    return cls(**{"r": r, "alpha": float(r), "target_roles": (), **specific})


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train(model: nn.Module, loss_at, steps: int, lr: float, every: int = 0, probe=None):
    """AdamW on the adapter for `steps` steps; `loss_at(step)` gives the loss tensor.

    Returns the loss before each step (stops at the first non-finite one, which ends the list) and, when
    `every` > 0, `probe(step)` taken after every `every`-th step.
    """
    opt = torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.0)
    hook = ll.track_steps(opt, model)
    losses, probes = [], []
    try:
        for step in range(steps):
            loss = loss_at(step)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if every and (step + 1) % every == 0:
                probes.append(probe(step + 1))
    finally:
        hook.remove()
    return losses, probes


def delta_norms(model: nn.Module) -> list[float]:
    """‖ΔW‖_F of every adapted layer, from its variant's `delta_weight`."""
    with torch.no_grad():
        return [layer.lora_variant.delta_weight(layer).norm().item() for _, layer in ll.adapted_layers(model)]


def delora_bounds(model: nn.Module) -> list[float]:
    """DeLoRA's bound per layer: each normalised rank-1 term has norm 1, so ‖ΔW‖_F <= |λ| max_j ‖W[:, j]‖."""
    with torch.no_grad():
        return [(layer.lora_lambda.abs() * layer.lora_wnorm.max()).item() for _, layer in ll.adapted_layers(model)]


# ---------------------------------------------------------------- digits

@functools.cache
def digits() -> dict[str, torch.Tensor]:
    """load_digits scaled to [0, 1]; odd and even digits each split in halves (train, test), fixed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    X, y = torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    out = {}
    for parity, mask in (("odd", y % 2 == 1), ("even", y % 2 == 0)):
        idx = torch.nonzero(mask).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        half = len(idx) // 2
        out[f"{parity}_train"], out[f"{parity}_test"] = idx[:half], idx[half:]
    return {"X": X, "y": y, **out}


@functools.cache
def digits_base(seed: int, steps: int) -> nn.Module:
    """The 64-128-10 MLP pretrained on the odd digits (full batch, AdamW 3e-3), frozen in eval mode."""
    d = digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    X, y = d["X"][d["odd_train"]], d["y"][d["odd_train"]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        loss = F.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def digits_eval(model: nn.Module) -> tuple[float, float]:
    """(cross-entropy, accuracy) on the held-out even digits."""
    d = digits()
    out, y = model(d["X"][d["even_test"]]), d["y"][d["even_test"]]
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def digits_adapt(variant, r, lr, steps, seed, base_steps, every=0, probe=None):
    """Adapt the odd-digit base of `seed` to the even digits; returns (model, train losses, probes)."""
    d = digits()
    model = copy.deepcopy(digits_base(seed, base_steps))
    torch.manual_seed(seed)
    ll.attach(model, config(variant, r, steps))
    X, y = d["X"][d["even_train"]], d["y"][d["even_train"]]
    losses, probes = train(model, lambda _: F.cross_entropy(model(X), y), steps, lr, every,
                           probe and (lambda step: probe(model, step)))
    return model, losses, probes


# ---------------------------------------------------------------- outlier channels

OUTLIER_SCALES = (50.0, 67.0, 83.0, 100.0)


def outlier_channels(d: int) -> torch.Tensor:
    """Input scales: 1 everywhere, x50-x100 on four channels spread over the width (one per quarter)."""
    scale = torch.ones(d)
    scale[torch.arange(len(OUTLIER_SCALES)) * (d // len(OUTLIER_SCALES))] = torch.tensor(OUTLIER_SCALES)
    return scale


@functools.cache
def outlier_target(d: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ΔW* (d, d), full rank and fixed (seed 0); the input scales; ‖ΔW*‖² on the ordinary channels.

    Inputs are x = scale ⊙ z with z ~ N(0, I), so E‖M x‖² = ‖M diag(scale)‖_F² for any M: the held-out
    error is exact from `delta_weight`, and the best any rank-r update can do is the tail of the singular
    values of ΔW* diag(scale) (Eckart-Young). Errors are reported over the ordinary channels' energy.
    """
    target = torch.randn(d, d, generator=torch.Generator().manual_seed(0)) / math.sqrt(d)
    scale = outlier_channels(d)
    return target, scale, target[:, scale == 1].pow(2).sum().item()


def outlier_floor(r: int, d: int) -> float:
    """The error of the best rank-r update (what LoRA of rank r could reach at best)."""
    target, scale, norm = outlier_target(d)
    S = torch.linalg.svdvals(target * scale)
    return S[r:].pow(2).sum().item() / norm


def outlier_adapt(variant, r, lr, steps, seed, d, batch, k=GRALORA_K) -> float:
    """Fit ΔW* through an adapter on a frozen random layer, fresh inputs every step (no overfitting).

    Returns the exact expected error of the learned update (inf when training diverged).
    """
    target, scale, norm = outlier_target(d)
    torch.manual_seed(seed)
    layer = nn.Linear(d, d, bias=False).eval()
    ll.attach(layer, config(variant, r, steps, k=k))
    W = layer.weight.detach()
    data = torch.Generator().manual_seed(1000 + seed)

    def loss_at(_):
        x = torch.randn(batch, d, generator=data) * scale
        return (layer(x) - x @ (W + target).t()).pow(2).sum(1).mean() / norm

    losses, _ = train(layer, loss_at, steps, lr)
    if len(losses) < steps:
        return float("inf")
    (_, adapted), = ll.adapted_layers(layer)
    with torch.no_grad():
        return ((adapted.lora_variant.delta_weight(adapted) - target) * scale).pow(2).sum().item() / norm


# ---------------------------------------------------------------- text

@functools.cache
def word_chain() -> tuple[list[str], dict[str, list[str]]]:
    """The words of scripts/text.txt (lower case, with . , ;) and each word's observed successors."""
    words = re.findall(r"[a-z]+|[.,;]", open(TEXT, encoding="utf-8").read().lower())
    successors: dict[str, list[str]] = {}
    for a, b in zip(words, words[1:]):
        successors.setdefault(a, []).append(b)
    return words, successors


def chain_text(n: int, seed: int, backwards: bool) -> torch.Tensor:
    """n bytes of a random walk on the word chain; `backwards` spells every word in reverse."""
    words, successors = word_chain()
    rng = random.Random(seed)
    w, out, size = rng.choice(words), [], 0
    while size < n:
        out.append(w[::-1] if backwards else w)
        size += len(w) + 1
        w = rng.choice(successors.get(w, words))
    return torch.tensor(list(" ".join(out).encode("ascii"))[:n])


def windows(ids: torch.Tensor, batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, len(ids) - seq, (batch,), generator=g)
    return torch.stack([ids[i:i + seq] for i in start.tolist()])


def tiny_lm(seed: int) -> nn.Module:
    """Qwen3, hidden 64, 2 layers, 4 heads of 16 and 4 KV heads (q, k, v, o all square), ASCII vocab."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg)


@functools.cache
def text_data(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"pre": chain_text(200_000, seed, False), "pre_test": chain_text(20_000, seed + 1, False),
            "shift": chain_text(50_000, seed + 2, True), "shift_test": chain_text(20_000, seed + 3, True)}


@functools.cache
def lm_base(steps: int, batch: int = 32, seq: int = 64) -> nn.Module:
    """The tiny LM pretrained on the forward chain (AdamW 3e-3), frozen in eval mode."""
    model, ids = tiny_lm(0), text_data()["pre"]
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        b = windows(ids, batch, seq, g)
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def lm_eval(model: nn.Module, key: str, seq: int = 64) -> float:
    """Next-byte cross-entropy on 64 fixed windows of a held-out text."""
    b = windows(text_data()[key], 64, seq, torch.Generator().manual_seed(1))
    return model(input_ids=b, labels=b).loss.item()


def lm_adapt(cfg: ll.AdapterConfig, lr, steps, seed, base_steps, batch=16, seq=64) -> tuple[nn.Module, bool]:
    """Adapt a copy of the pretrained LM to the backwards text; returns the model and whether it diverged."""
    model = copy.deepcopy(lm_base(base_steps))
    torch.manual_seed(seed)
    ll.attach(model, cfg)
    ids, g = text_data()["shift"], torch.Generator().manual_seed(seed)

    def loss_at(_):
        b = windows(ids, batch, seq, g)
        return model(input_ids=b, labels=b).loss

    losses, _ = train(model, loss_at, steps, lr)
    return model, len(losses) < steps
