"""Which modules are linear-like, what role each plays, and which ones a config selects.

Roles come from structure: a `reader` takes the residual stream in (d_in == d_model),
a `writer` puts its output back (d_out == d_model), an `inner` layer does neither.
A square d_model x d_model layer is both by shape, so its name decides.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

from .config import AdapterConfig
from .weights import dims, is_linear_like
from .wrappers import unwrap

WRITER_NAMES = {"o_proj", "out_proj", "down_proj", "c_proj", "dense", "fc2", "w2", "wo", "out"}
READER_NAMES = {"q_proj", "k_proj", "v_proj", "c_attn", "query", "key", "value", "qkv", "qkv_proj",
                "gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3", "wq", "wk", "wv"}
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")


@dataclass
class Target:
    name: str  # canonical module path, e.g. "model.layers.0.self_attn.q_proj"
    layer: nn.Module
    role: str | None  # None: a square layer whose name resolves no role
    d_in: int
    d_out: int

    def describe(self) -> str:
        return f"{self.name} ({self.role or 'square?'} {self.d_in}->{self.d_out})"


def d_model_of(model: nn.Module) -> int:
    """hidden_size from the config, else the input embedding width, else the most common layer width."""
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if embeddings:
        return embeddings[0].embedding_dim
    widths = Counter()
    for m in model.modules():
        if is_linear_like(m):
            widths.update(dims(m))
    if not widths:
        raise ValueError(f"{type(model).__name__} has no linear-like modules")
    # the most common width is the residual stream: every reader and writer touches it
    return widths.most_common(1)[0][0]


def role_of(name: str, d_in: int, d_out: int, d_model: int) -> str | None:
    if d_in == d_model and d_out == d_model:
        leaf = name.rsplit(".", 1)[-1]
        return "writer" if leaf in WRITER_NAMES else "reader" if leaf in READER_NAMES else None
    return "reader" if d_in == d_model else "writer" if d_out == d_model else "inner"


def candidates(model: nn.Module) -> list[Target]:
    """Every linear-like module of the model with its role."""
    model = unwrap(model)
    width = d_model_of(model)
    out = []
    for name, m in model.named_modules():
        if is_linear_like(m):
            d_in, d_out = dims(m)
            out.append(Target(name, m, role_of(name, d_in, d_out, width), d_in, d_out))
    return out


def layer_index(name: str) -> int | None:
    m = LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def _listing(targets: list[Target], limit: int = 60) -> str:
    lines = [t.describe() for t in targets[:limit]]
    if len(targets) > limit:
        lines.append(f"... and {len(targets) - limit} more")
    return "\n  ".join(lines)


def select(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """The targets `cfg` selects, in model order. Raises ValueError on typos and empty selections."""
    all_ = candidates(model)
    # an output head whose weight is the input embedding's (tied) is left out unless named: adapting it
    # trains the embedding's twin, and merging it would rewrite the embedding too
    tied = {id(m.weight) for m in unwrap(model).modules() if isinstance(m, nn.Embedding)}
    pool = [t for t in all_ if not any(re.search(p, t.name) for p in cfg.exclude_names)
            and (id(t.layer.weight) not in tied or any(re.search(p, t.name) for p in cfg.target_names))]
    for pattern in cfg.target_names:
        if not any(re.search(pattern, t.name) for t in pool):
            raise ValueError(f"target_names pattern {pattern!r} matches no linear-like module "
                             f"(after exclude_names). Candidates:\n  {_listing(pool)}")
    if cfg.target_names:
        pool = [t for t in pool if any(re.search(p, t.name) for p in cfg.target_names)]
    if cfg.layers is not None:
        present = sorted({i for t in all_ if (i := layer_index(t.name)) is not None})
        missing = sorted(set(cfg.layers) - set(present))
        if missing:
            raise ValueError(f"layers {missing} do not exist in {type(model).__name__}; "
                             f"layer indices present: {present}")
        pool = [t for t in pool if layer_index(t.name) in cfg.layers]
    if cfg.target_roles:
        roles = set(cfg.target_roles)
        for t in pool:
            if t.role is None and len(roles & {"reader", "writer"}) == 1:
                raise ValueError(f"cannot tell whether square layer {t.name} ({t.d_in}->{t.d_out}) is a "
                                 f"reader or a writer from its name, and target_roles={cfg.target_roles} "
                                 f"needs to know: select it with target_names and target_roles=()")
        pool = [t for t in pool if (t.role in roles) or (t.role is None and {"reader", "writer"} <= roles)]
    if not pool:
        raise ValueError(f"{type(cfg).__name__} selected no module (target_roles={cfg.target_roles}, "
                         f"target_names={cfg.target_names}, exclude_names={cfg.exclude_names}, "
                         f"layers={cfg.layers}). Candidates:\n  {_listing(all_)}")
    return pool


def pattern_hits(targets: list[Target], cfg: AdapterConfig) -> dict[str, int]:
    """How many of `targets` each of the user's target_names patterns selected (for ll.summary)."""
    return {p: sum(1 for t in targets if re.search(p, t.name)) for p in cfg.target_names}
