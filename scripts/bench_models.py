"""The models `scripts/bench.py` times: the random-weight Qwen3 base, ours attached, the reference attached.

One place for every reference implementation: PEFT 0.21 (LoRA, PiSSA, DeLoRA, GraLoRA), peft-singlora 0.2.0.
"""
from __future__ import annotations

import copy

import torch

import lora_lite as ll

R, ALPHA, GRALORA_K, SINGLORA_STEP = 8, 16, 2, 500  # SingLoRA mid-ramp (u = 0.5): no variant may skip work
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REFERENCE = {"lora": "peft", "pissa": "peft", "delora": "peft", "gralora": "peft", "singlora": "peft-singlora"}


def build_base(hidden: int, layers: int, seq: int, vocab: int, dtype: str, device: str) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = max(1, hidden // 64)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      head_dim=hidden // heads, max_position_embeddings=max(seq, 64), tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).to(device=device, dtype=getattr(torch, dtype))


def our_config(name: str, dtype: str, **opts) -> ll.AdapterConfig:
    cls = ll.REGISTRY[name].config
    extra = {"k": GRALORA_K} if "k" in cls.__dataclass_fields__ else {}
    return cls(r=R, alpha=ALPHA, dtype=getattr(torch, dtype), target_roles=(), **extra, **opts)


def ours(name: str, model, dtype: str, **opts):
    """lora-lite's `name` attached to `model` itself (pass a copy)."""
    ll.attach(model, our_config(name, dtype, **opts))
    if name == "singlora":
        ll.set_step(model, SINGLORA_STEP)
    return model


def reference(name: str, model, pissa_init: str = "pissa_niter_4"):
    """The reference implementation of `name` on `model` itself (pass a copy)."""
    from peft import get_peft_model

    if name == "singlora":
        # SingLoRAConfig registers its layer on this config only (setup_singlora() would patch LoraConfig globally)
        from peft_singlora import SingLoRAConfig, update_singlora_global_step

        peft_model = get_peft_model(model, SingLoRAConfig(r=R, lora_alpha=ALPHA, target_modules=PROJECTIONS))
        update_singlora_global_step(peft_model, SINGLORA_STEP)
        return peft_model
    from peft import DeloraConfig, GraloraConfig, LoraConfig

    cfg = {
        "lora": lambda: LoraConfig(r=R, lora_alpha=ALPHA, target_modules=PROJECTIONS),
        "pissa": lambda: LoraConfig(r=R, lora_alpha=ALPHA, target_modules=PROJECTIONS, init_lora_weights=pissa_init),
        "delora": lambda: DeloraConfig(r=R, delora_lambda=15, target_modules=PROJECTIONS),
        "gralora": lambda: GraloraConfig(r=R, alpha=ALPHA, gralora_k=GRALORA_K, hybrid_r=0,
                                         target_modules=PROJECTIONS),
    }[name]()
    return get_peft_model(model, cfg)


def frozen_base(base):
    """A frozen copy whose embedding output requires grad, so its backward runs through every block."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(mark_requires_grad)
    return model


def mark_requires_grad(module, args, out):
    return out.requires_grad_(True) if torch.is_grad_enabled() else out


def three(name: str, base, dtype: str) -> dict:
    """base (frozen), ours and the reference, each on its own copy of `base`."""
    return {"base": frozen_base(base), "ours": ours(name, copy.deepcopy(base), dtype),
            "ref": reference(name, copy.deepcopy(base))}
