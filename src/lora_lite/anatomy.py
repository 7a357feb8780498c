"""Which modules are linear-like and what role each plays, judged against the width of its sub-model.

Roles come from structure: a `reader` takes the residual stream in (d_in == width),
a `writer` puts its output back (d_out == width), an `inner` layer does neither.
A square width x width layer is both by shape, so its name decides.

The width is that of the sub-model a layer belongs to: the innermost module around it
whose `config` carries one (transformers sub-models do: a LLaVA's vision tower and
language model have their own), so a composite model's towers each get their own.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

from .exclusions import bypassed, call_method
from .weights import dims, is_linear_like
from .wrappers import unwrap

WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")
WRITER_NAMES = {"o_proj", "out_proj", "down_proj", "c_proj", "dense", "fc2", "w2", "wo", "out", "o"}
READER_NAMES = {"q_proj", "k_proj", "v_proj", "c_attn", "query", "key", "value", "qkv", "qkv_proj",
                "gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3", "wq", "wk", "wv", "q", "k", "v"}
# the outermost match is the block: T5's `encoder.block.0.layer.1.DenseReluDense.wi` is in block 0
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")


@dataclass
class Target:
    name: str  # canonical module path, e.g. "model.layers.0.self_attn.q_proj"
    layer: nn.Module
    role: str | None  # None: a square layer whose name resolves no role
    d_in: int
    d_out: int
    width: int | None = None  # the residual width the role was judged against
    scope: str = ""  # the sub-model that width comes from ("" is the whole model)

    def describe(self) -> str:
        return f"{self.name} ({self.role or 'square?'} {self.d_in}->{self.d_out})"


def _config_width(module: nn.Module) -> int | None:
    config = getattr(module, "config", None)
    for key in WIDTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _scopes(model: nn.Module) -> tuple[dict[str, str], dict[str, int | None]]:
    """(module path -> the prefix of its sub-model, sub-model prefix -> its config width or None).

    A module starts a sub-model when its config carries a width other than the enclosing one's
    (attention and MLP modules of transformers carry their model's config: no new sub-model)."""
    scope_of, width = {}, {"": _config_width(model)}
    for name, m in model.named_modules():  # parents come before their children
        if not name:
            scope_of[name] = ""
            continue
        outer = scope_of[name.rpartition(".")[0]]
        own = _config_width(m)
        if own is not None and own != width[outer]:
            scope_of[name], width[name] = name, own
        else:
            scope_of[name] = outer
    return scope_of, width


def _fallback_width(model: nn.Module, members: list[nn.Module]) -> int | None:
    """The width of the part of `model` outside every sub-model with a config width: the model's input
    embedding, else the first embedding there, else the most common layer width there (never the
    widest: that is the MLP's inner width, and it would invert every role)."""
    embedding = call_method(model, "get_input_embeddings")
    if not isinstance(embedding, nn.Embedding):
        embedding = next((m for m in members if isinstance(m, nn.Embedding)), None)
    if embedding is not None:
        return embedding.embedding_dim
    counts = Counter()
    for m in members:
        if is_linear_like(m):
            counts.update(dims(m))
    # the most common width is the residual stream: every reader and writer touches it
    return counts.most_common(1)[0][0] if counts else None


def _resolved(model: nn.Module) -> tuple[dict[str, str], dict[str, int | None]]:
    scope_of, width = _scopes(model)
    if width[""] is None:
        members = [m for n, m in model.named_modules() if scope_of[n] == ""]
        width[""] = _fallback_width(model, members)
    return scope_of, width


def widths(model: nn.Module) -> dict[str, int | None]:
    """{sub-model prefix: the width roles are judged against}; "" is the model itself.

    None only for a model part without any linear-like module or embedding to tell it."""
    return _resolved(unwrap(model))[1]


def role_of(name: str, d_in: int, d_out: int, d_model: int | None) -> str | None:
    if d_in == d_model and d_out == d_model:
        leaf = name.rsplit(".", 1)[-1]
        return "writer" if leaf in WRITER_NAMES else "reader" if leaf in READER_NAMES else None
    return "reader" if d_in == d_model else "writer" if d_out == d_model else "inner"


def candidates(model: nn.Module) -> list[Target]:
    """Every adaptable linear-like module of the model with its role, in model order."""
    model = unwrap(model)
    scope_of, width = _resolved(model)
    skipped = bypassed(model)
    out = []
    for name, m in model.named_modules():
        if is_linear_like(m) and name not in skipped:
            d_in, d_out = dims(m)
            w = width[scope_of[name]]
            out.append(Target(name, m, role_of(name, d_in, d_out, w), d_in, d_out, w, scope_of[name]))
    return out


def block_index(name: str) -> int | None:
    m = BLOCK_INDEX.search(name)  # leftmost match: the outermost block
    return int(m.group(1)) if m else None
