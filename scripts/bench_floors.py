"""Two floors for an adapter's cost, counted from the shapes of the adapted layers.

FLOP floor: adapter matmul FLOPs / base FLOPs per token, forward only (the backward multiplies both by about
the same factor). On a CPU, and on a GPU for small r, the rank-r products run at memory speed, so this is
not what bounds the overhead.

Memory floor: the bytes an adapted layer must move per step without replacing the base layer's forward or
backward, over the bandwidth of a large copy measured in the same process. Forward: read x, read y and write
y + update (the base wrote y already). Backward: read the output gradient g, read x (for A's gradient), write
the adapter's share of x's gradient. The adapter's own tensors are r (d_in + d_out) each, under 2% of that
at r = 8 and widths from 256 on: left out. Inference moves the forward's bytes only.
"""
from __future__ import annotations

import torch

from bench_models import PROJECTIONS, R


def adapted_linears(model):
    """(d_in, d_out) of every adapted projection, from the plain base model."""
    return [(m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS]


def adapter_flops(name: str, d_in: int, d_out: int) -> int:
    """Matmul FLOPs per token of one adapted layer's forward."""
    low_rank = 2 * R * (d_in + d_out)  # x -> (r) -> (d_out); GraLoRA's k blocks sum to the same
    return 2 * low_rank if name == "pissa" else low_rank  # PiSSA runs B A x and the frozen B0 A0 x


def flop_floor(name: str, base, seq: int) -> float:
    """Adapter / base forward FLOPs per token for the whole model (linears, causal attention, lm_head)."""
    cfg = base.config
    base_flops = sum(2 * m.in_features * m.out_features for m in base.modules() if isinstance(m, torch.nn.Linear))
    adapter = sum(adapter_flops(name, d_in, d_out) for d_in, d_out in adapted_linears(base))
    # q k^T and att v over on average seq/2 keys (causal), every head
    base_flops += cfg.num_hidden_layers * 2 * 2 * (seq // 2) * cfg.num_attention_heads * cfg.head_dim
    return adapter / base_flops


def floor_bytes(base, tokens: int, train: bool) -> int:
    """Minimum bytes all adapted layers move in one train step (or one inference forward)."""
    element = next(base.parameters()).element_size()
    per_token = sum((d_in + 2 * d_out) + ((d_out + 2 * d_in) if train else 0) for d_in, d_out in adapted_linears(base))
    return element * tokens * per_token


def memory_floor(base, tokens: int, bytes_per_s: float) -> dict[str, float]:
    """Seconds the adapted layers must spend moving their bytes: train step and inference."""
    return {kind: floor_bytes(base, tokens, kind == "train") / bytes_per_s for kind in ("train", "inference")}
