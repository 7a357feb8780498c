"""Shared pieces of the real-model checks (qwen_probe.py, smoke.py, peft_roundtrip.py): tiny Qwen3, Llama and
GPT-2 models, byte tokens, a training loop.

Nothing here downloads: the default model is a transformers `Qwen3ForCausalLM` built from a config with random
weights, and text is tokenized byte by byte (vocab 256), so the checks run offline in seconds on a CPU.
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

import lora_lite as ll

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text.txt")

# Per-variant settings that make a short probe meaningful: SingLoRA's ramp (u = t / T) must end within a few
# dozen steps; GraLoRA's k must divide every width of the tiny Qwen3 (64, 32, 128) and r.
SETTINGS = {"singlora": {"ramp_up_steps": 5}, "gralora": {"k": 2}}


def config_for(name: str, **kw) -> ll.AdapterConfig:
    """The registered variant's config with SETTINGS applied (only fields it has), then `kw`."""
    cls = ll.REGISTRY[name].config
    extra = {k: v for k, v in SETTINGS.get(name, {}).items() if k in cls.__dataclass_fields__}
    return cls(**{**extra, **kw})


def variants(arg: str | None) -> list[str]:
    """`--variants lora,pissa` -> ["lora", "pissa"]; None -> every registered variant."""
    names = sorted(ll.REGISTRY) if not arg else [v.strip() for v in arg.split(",") if v.strip()]
    unknown = [v for v in names if v not in ll.REGISTRY]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; registered: {sorted(ll.REGISTRY)}")
    return names


def tiny_qwen3(vocab: int = 256, hidden: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    """A Qwen3ForCausalLM with random weights: 4 query heads of 16, 2 KV heads (q 64->64, k/v 64->32)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg).eval()


def tiny_llama(vocab: int = 256, hidden: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    """A LlamaForCausalLM with random weights: 4 query heads of 16, 2 KV heads (q 64->64, k/v 64->32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab: int = 256, hidden: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    """A GPT2LMHeadModel with random weights: its attention and MLP layers are transformers' Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def text_ids(tokenizer=None, path: str = TEXT) -> list[int]:
    """The training text as token ids: the tokenizer's when given, else its UTF-8 bytes (ids in [0, 256))."""
    text = open(path, encoding="utf-8").read()
    return tokenizer(text)["input_ids"] if tokenizer is not None else list(text.encode("utf-8"))


def windows(ids: list[int], batch: int = 4, seq: int = 64) -> torch.Tensor:
    """`batch` windows of `seq` ids spread evenly over `ids`: one fixed batch of shape (batch, seq)."""
    if len(ids) < seq:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than seq={seq}")
    step = (len(ids) - seq) // max(batch - 1, 1)
    return torch.tensor([ids[i * step:i * step + seq] for i in range(batch)], dtype=torch.long)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def base_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_tensors(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    """True when the model's state dict is bit for bit the snapshot (same keys, torch.equal values)."""
    state = model.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], v) for k, v in snapshot.items())


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (parameters and buffers) by full key; views that share the model's storage."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1].startswith("lora_")}


def adapter_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train(model: nn.Module, ids: torch.Tensor, steps: int, lr: float, log=None) -> tuple[list[float], float]:
    """AdamW (no weight decay, so only gradients move the adapter) on one fixed batch.

    Returns the losses before each step plus the loss after the last one (steps + 1 values), and the adapter
    gradient norm at the first step. `ll.track_steps` advances step-scheduled variants (SingLoRA's ramp).
    """
    params = adapter_params(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    hook = ll.track_steps(opt, model)
    losses, grad0 = [], float("nan")
    try:
        for step in range(steps):
            loss = lm_loss(model, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step == 0:
                grad0 = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()
            opt.step()
            losses.append(loss.item())
            if log:
                log(step, loss.item())
        with torch.no_grad():
            losses.append(lm_loss(model, ids).item())
    finally:
        hook.remove()
    return losses, grad0


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
