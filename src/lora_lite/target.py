"""Which modules a config selects: name matching (PEFT's list semantics for plain names), default and user
exclusions, block indices, roles; every pattern must match, and errors list the candidates and what cannot be
adapted."""
from __future__ import annotations

import re

from torch import nn

from .anatomy import Target, block_index, candidates
from .config import PLAIN, AdapterConfig
from .exclusions import Unadaptable, heads, unadaptable
from .wrappers import unwrap



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


def _hits(pattern: str, u: Unadaptable) -> bool:
    """A pattern names an unadaptable part by its own path or by its module's (`mlp\\.experts$`)."""
    return matches(pattern, u.name) or matches(pattern, u.name.rpartition(".")[0])


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
