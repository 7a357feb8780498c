"""`ll.summary`: what is adapted, at a glance — one row per kind of module (`model.layers.*.self_attn.q_proj
×24`: block and expert indices become `*`) with role, shape, variant, rank and trainable parameters; the
per-layer table with `verbose=True` — then PEFT's `print_trainable_parameters` line, the width each sub-model's
roles were judged against, what each target_names pattern matched at attach (patterns are never re-run: a
file's patterns are never run at all), the heads left out by default, and what cannot be adapted."""
from __future__ import annotations

import re
from collections import Counter

from torch import nn

from .anatomy import candidates, widths
from .exclusions import heads, unadaptable
from .state import HITS, adapted_layers, saved_modules
from .weights import dims, param_count
from .wrappers import unwrap

INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # a numeric path part: a block, an expert, a list entry
HEADER = ("module", "role", "d_in->d_out", "variant", "r", "trainable")


def rank_of(layer: nn.Module) -> int:
    """The adapter's rank on `layer`: the one place summary reads it (per-module ranks change only this)."""
    return layer.lora_config.r


def kind_of(name: str) -> str:
    """`model.layers.3.mlp.experts.5.up_proj` -> `model.layers.*.mlp.experts.*.up_proj`."""
    return INDEX.sub("*", name)


def trainable_line(root: nn.Module) -> str:
    """PEFT's `print_trainable_parameters` line, counted as PEFT counts (all params include the adapter's)."""
    params = list(root.parameters())
    total = sum(param_count(p) for p in params)
    trainable = sum(param_count(p) for p in params if p.requires_grad)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def _rows(root: nn.Module, layers: list[tuple[str, nn.Module]], verbose: bool) -> list[tuple[str, ...]]:
    """(module, role, shape, variant, r, trainable) per layer, or per kind of layer with its count."""
    roles = {t.name: t.role for t in candidates(root)}
    kinds: dict[tuple, list] = {}  # insertion order: model order of each kind's first layer
    for name, layer in layers:
        n = sum(p.numel() for p in layer._parameters.values() if p is not None and p.requires_grad)
        d_in, d_out = dims(layer)
        key = (name if verbose else kind_of(name), roles.get(name) or "square?", f"{d_in}->{d_out}",
               layer.lora_variant.name, str(rank_of(layer)))
        entry = kinds.setdefault(key, [0, 0, name])  # a kind of one layer is shown by its own name
        entry[0] += 1
        entry[1] += n
    return [(f"{key[0]} ×{count}" if count > 1 else first, *key[1:], f"{n:,}")
            for key, (count, n, first) in kinds.items()]


def summary(model: nn.Module, verbose: bool = False) -> str:
    """One row per kind of adapted module (every layer with `verbose=True`): module, role, d_in->d_out, variant,
    r, trainable params; PEFT's trainable-parameters line; then widths, pattern hits, heads, what cannot be adapted."""
    root = unwrap(model)
    layers = adapted_layers(root)
    if not layers:
        return "no adapter attached"
    rows = [HEADER, *_rows(root, layers, verbose)]
    cols = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, cols)).rstrip() for r in rows]
    kinds = "" if verbose else f", {len(rows) - 1} kinds (ll.summary(model, verbose=True) lists each layer)"
    lines.append(f"{len(layers)} layers adapted{kinds}")
    lines.append(trainable_line(root))
    for path, m in saved_modules(root).items():
        lines.append(f"trained whole (modules_to_save): {path}, {sum(p.numel() for p in m.parameters()):,} params")
    return "\n".join(lines + _structure(root, {n for n, _ in layers}))


def _structure(root: nn.Module, adapted: set[str]) -> list[str]:
    """The lines under the table: widths, pattern hits, heads left out, what cannot be adapted."""
    scopes = widths(root)
    lines = ["roles judged against width " + ", ".join(f"{w} ({p or 'the model'})" for p, w in scopes.items())]
    for pattern, hits in root.__dict__.get(HITS, {}).items():
        shown = ", ".join(hits[:3]) + (", ..." if len(hits) > 3 else "")
        lines.append(f"target_names {pattern!r} matched {len(hits)}: {shown}")
    left = {n: why for n, why in heads(root).items() if n not in adapted and n not in saved_modules(root)}
    if left:
        lines.append("heads left out (name them in target_names to adapt): "
                     + ", ".join(f"{n} ({why})" for n, why in left.items()))
    groups = Counter((kind_of(u.name), u.kind) for u in unadaptable(root))
    if groups:
        lines.append("not adaptable:")
        lines += [f"  {name} ({kind})" + (f" x{n}" if n > 1 else "") for (name, kind), n in list(groups.items())[:30]]
        if len(groups) > 30:
            lines.append(f"  ... and {len(groups) - 30} more kinds")
    return lines
