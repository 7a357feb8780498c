"""Which modules are linear-like, what role each plays, and which ones a config selects.

Roles come from structure: a `reader` takes the residual stream in (d_in == width),
a `writer` puts its output back (d_out == width), an `inner` layer does neither.
A square width x width layer is both by shape, so its name decides.

The width is that of the sub-model a layer belongs to: the innermost module around it
whose `config` carries one (transformers sub-models do: a LLaVA's vision tower and
language model have their own), so a composite model's towers each get their own.
What cannot be adapted (convolutions, fused expert tensors, layers whose parent
bypasses their forward) is listed by `unadaptable`, never silently skipped.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from .config import AdapterConfig
from .weights import dims, is_linear_like
from .wrappers import unwrap

WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")
WRITER_NAMES = {"o_proj", "out_proj", "down_proj", "c_proj", "dense", "fc2", "w2", "wo", "out", "o"}
READER_NAMES = {"q_proj", "k_proj", "v_proj", "c_attn", "query", "key", "value", "qkv", "qkv_proj",
                "gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3", "wq", "wk", "wv", "q", "k", "v"}
# the outermost match is the block: T5's `encoder.block.0.layer.1.DenseReluDense.wi` is in block 0
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")
# output and task heads by name (transformers' own: causal LM, sequence / token classification, QA);
# a path component equal to one of these marks a head
HEAD_NAMES = {"lm_head", "embed_out", "embed_tokens", "classifier", "score", "qa_outputs"}
PLAIN = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")  # a module path, or its tail: no regex syntax


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


class Unadaptable(NamedTuple):
    name: str  # module path, or module path + "." + parameter name for a bare parameter
    kind: str  # short label, e.g. "Conv2d", "fused MoE experts (4, 128, 32)"
    reason: str  # why lora-lite does not adapt it, as a sentence fragment


BYPASSED = ("its parent nn.MultiheadAttention uses its weight functionally and never calls its forward, "
            "so a hook on it would never run")
EXPERTS = "fused MoE expert parameters are not supported (adapt the attention and dense layers instead)"
CONV = "convolutions are not supported: lora-lite adapts linear-like layers"
BARE = "a bare parameter used functionally has no layer forward to hook"


def matches(pattern: str, name: str) -> bool:
    """PEFT's list semantics for plain names, regex search for the rest.

    A pattern made only of identifier characters and dots names whole parts of the path: "q" matches
    "encoder.block.0.layer.0.SelfAttention.q", not "encoder" or "block"; "self_attn.q_proj" matches
    "model.layers.0.self_attn.q_proj", "attn.q_proj" does not. It is a trailing part of the path of the
    module or of a module around it: naming a container ("mlp") means the layers inside it. Wherever PEFT
    accepts a `target_modules` list (it names no container), this selects the same modules.
    Any other pattern is a regex searched in the path.
    """
    if PLAIN.fullmatch(pattern):
        return f".{pattern}." in f".{name}."
    return re.search(pattern, name) is not None


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
    embedding = _call(model, "get_input_embeddings")
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


def _bypassed(model: nn.Module) -> set[str]:
    """Linear-like modules whose forward their parent never calls (nn.MultiheadAttention's out_proj)."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out |= {f"{name}.{c}" if name else c for c, child in m.named_children() if is_linear_like(child)}
    return out


def candidates(model: nn.Module) -> list[Target]:
    """Every adaptable linear-like module of the model with its role, in model order."""
    model = unwrap(model)
    scope_of, width = _resolved(model)
    bypassed = _bypassed(model)
    out = []
    for name, m in model.named_modules():
        if is_linear_like(m) and name not in bypassed:
            d_in, d_out = dims(m)
            w = width[scope_of[name]]
            out.append(Target(name, m, role_of(name, d_in, d_out, w), d_in, d_out, w, scope_of[name]))
    return out


def _parameter_kind(module: nn.Module, pname: str, shape: tuple[int, ...]) -> tuple[str, str] | None:
    """(kind, reason) for a weight matrix held as a bare parameter; None for vectors, tokens and
    position tables (`cls_token` (1, 1, d), `position_embeddings` (1, n, d)), which hold no map to adapt."""
    owner = type(module).__name__
    if sum(s > 1 for s in shape) < 2 or "embed" in pname.lower() or "embed" in owner.lower():
        return None
    if len(shape) >= 3:
        if "expert" in owner.lower() or "expert" in pname.lower():
            return f"fused MoE experts {shape}", EXPERTS
        return f"fused {len(shape)}-D parameter {shape} of {owner}", BARE
    return f"bare parameter {shape} of {owner}", BARE


def unadaptable(model: nn.Module) -> list[Unadaptable]:
    """Weight-bearing parts that are not adapted, and why: convolutions, fused expert tensors, bare weight
    matrices used functionally (nn.MultiheadAttention's in_proj_weight, a MoE router's weight) and
    linear layers whose forward their parent bypasses. Embeddings and norms are left out: they are
    not adapted by design."""
    model = unwrap(model)
    bypassed = _bypassed(model)
    out = []
    for name, m in model.named_modules():
        if is_linear_like(m):
            if name in bypassed:
                out.append(Unadaptable(name, "bypassed by nn.MultiheadAttention", BYPASSED))
        elif isinstance(m, nn.modules.conv._ConvNd):
            out.append(Unadaptable(name, type(m).__name__, CONV))
        elif not isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            for pname, p in m.named_parameters(recurse=False):
                kind = _parameter_kind(m, pname, tuple(p.shape))
                if kind is not None:
                    out.append(Unadaptable(f"{name}.{pname}" if name else pname, *kind))
    return out


def _hits(pattern: str, u: Unadaptable) -> bool:
    """A pattern names an unadaptable part by its own path or by its module's (`mlp\\.experts$`)."""
    return matches(pattern, u.name) or matches(pattern, u.name.rpartition(".")[0])


def heads(model: nn.Module) -> dict[str, str]:
    """{module path: why} of the output and task heads: not default targets (a fresh task head is trained
    whole, with modules_to_save; an output head is the embedding's twin). By structure: transformers'
    output embeddings, every linear outside `model.base_model`, a weight tied to an input embedding;
    by name: a path component in HEAD_NAMES."""
    model = unwrap(model)
    out = {}
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    output = _call(model, "get_output_embeddings")
    base = getattr(model, "base_model", model)
    base_prefix = next((n for n, m in model.named_modules() if m is base), "")
    for name, m in model.named_modules():
        if not is_linear_like(m):
            continue
        if m is output:
            out[name] = "output embeddings"
        elif base_prefix and not (name + ".").startswith(base_prefix + "."):
            out[name] = f"task head (outside the base model {base_prefix})"
        elif id(m.weight) in tied:
            out[name] = "tied to an input embedding"
        elif HEAD_NAMES & set(name.split(".")):
            out[name] = "head by name"
    return out


def _call(model: nn.Module, method: str):
    get = getattr(model, method, None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def block_index(name: str) -> int | None:
    m = BLOCK_INDEX.search(name)  # leftmost match: the outermost block
    return int(m.group(1)) if m else None


def _listing(items: list, limit: int = 60) -> str:
    lines = [t.describe() if isinstance(t, Target) else f"{t.name} ({t.kind})" for t in items[:limit]]
    if len(items) > limit:
        lines.append(f"... and {len(items) - limit} more")
    return "\n  ".join(lines)


def _not_adaptable(blocked: list[Unadaptable]) -> str:
    return f"\nNot adaptable:\n  {_listing(blocked)}" if blocked else ""


def _excluded(model: nn.Module, all_: list[Target], cfg: AdapterConfig) -> tuple[set[str], set[str]]:
    """(names the user's exclude_names remove, default exclusions no target_names entry names)."""
    user = {t.name for t in all_ if any(matches(p, t.name) for p in cfg.exclude_names)}
    named = {t.name for t in all_ if any(matches(p, t.name) for p in cfg.target_names)}
    return user, set(heads(model)) - named


def _check_patterns(cfg: AdapterConfig, pool: list[Target], user_excluded: set[str],
                    blocked: list[Unadaptable]) -> None:
    """Every target_names entry must match a module left in `pool`; else say what it did match."""
    for pattern in cfg.target_names:
        if any(matches(pattern, t.name) for t in pool):
            continue
        hit = [u for u in blocked if _hits(pattern, u)]
        if hit:
            reasons = sorted({u.reason for u in hit})
            raise ValueError(f"target_names pattern {pattern!r} matches only what lora-lite cannot adapt: "
                             f"{'; '.join(reasons)}. It matches:\n  {_listing(hit)}\n"
                             f"Adaptable candidates:\n  {_listing(pool)}")
        excluded = sorted(n for n in user_excluded if matches(pattern, n))
        if excluded:
            raise ValueError(f"target_names pattern {pattern!r} matches only modules that exclude_names="
                             f"{cfg.exclude_names} removes: {excluded}; drop them from exclude_names")
        raise ValueError(f"target_names pattern {pattern!r} matches no linear-like module. Candidates:\n  "
                         f"{_listing(pool)}{_not_adaptable(blocked)}")


def _by_layers(pool: list[Target], all_: list[Target], cfg: AdapterConfig, model: nn.Module) -> list[Target]:
    if cfg.layers is None:
        return pool
    present = sorted({i for t in all_ if (i := block_index(t.name)) is not None})
    missing = sorted(set(cfg.layers) - set(present))
    if missing:
        raise ValueError(f"layers {missing} do not exist in {type(model).__name__} (an index is the block's: the "
                         f"outermost layers.N / layer.N / h.N / block.N / blocks.N of a path); present: {present}")
    return [t for t in pool if block_index(t.name) in cfg.layers]


def _by_roles(pool: list[Target], cfg: AdapterConfig) -> list[Target]:
    if not cfg.target_roles:
        return pool
    roles = set(cfg.target_roles)
    for t in pool:
        if t.role is None and len(roles & {"reader", "writer"}) == 1:
            raise ValueError(f"cannot tell whether square layer {t.name} ({t.d_in}->{t.d_out}) is a "
                             f"reader or a writer from its name, and target_roles={cfg.target_roles} "
                             f"needs to know: select it with target_names and target_roles=()")
    return [t for t in pool if (t.role in roles) or (t.role is None and {"reader", "writer"} <= roles)]


def select(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """The targets `cfg` selects, in model order. Raises ValueError on typos and empty selections.

    Excluded: what exclude_names matches, and (unless a target_names entry names them) the heads."""
    model = unwrap(model)
    all_, blocked = candidates(model), unadaptable(model)
    user_excluded, default_excluded = _excluded(model, all_, cfg)
    pool = [t for t in all_ if t.name not in user_excluded | default_excluded]
    _check_patterns(cfg, pool, user_excluded, blocked)
    if not all_:
        raise ValueError(f"{type(model).__name__} has no linear-like module to adapt{_not_adaptable(blocked)}")
    if cfg.target_names:
        pool = [t for t in pool if any(matches(p, t.name) for p in cfg.target_names)]
    pool = _by_roles(_by_layers(pool, all_, cfg, model), cfg)
    if not pool:
        raise ValueError(f"{type(cfg).__name__} selected no module (target_roles={cfg.target_roles}, "
                         f"target_names={cfg.target_names}, exclude_names={cfg.exclude_names}, "
                         f"layers={cfg.layers}; heads are excluded unless named). Candidates:\n  "
                         f"{_listing(all_)}{_not_adaptable(blocked)}")
    return pool


def pattern_hits(targets: list[Target], cfg: AdapterConfig) -> dict[str, list[str]]:
    """The names of the `targets` each of the user's target_names patterns selected (for ll.summary)."""
    return {p: [t.name for t in targets if matches(p, t.name)] for p in cfg.target_names}
