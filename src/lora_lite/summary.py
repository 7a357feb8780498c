"""`ll.summary`: what is adapted, with role, shape, variant and trainable parameters; the width each
sub-model's roles were judged against; what each target_names pattern matched at attach (patterns are never
re-run: a file's patterns are never run at all); the heads left out by default; what cannot be adapted."""
from __future__ import annotations

from collections import Counter

from torch import nn

from .anatomy import BLOCK_INDEX, candidates, widths
from .exclusions import heads, unadaptable
from .state import HITS, adapted_layers, lora_tensors
from .weights import dims
from .wrappers import unwrap


def summary(model: nn.Module) -> str:
    """A table of adapted layers: module, role, d_in->d_out, variant, trainable params; totals and %."""
    root = unwrap(model)
    layers = adapted_layers(root)
    if not layers:
        return "no adapter attached"
    roles = {t.name: t.role for t in candidates(root)}
    rows = [("module", "role", "d_in->d_out", "variant", "trainable")]
    total = 0
    for name, layer in layers:
        n = sum(p.numel() for p in layer._parameters.values() if p is not None and p.requires_grad)
        total += n
        d_in, d_out = dims(layer)
        rows.append((name, roles.get(name) or "square?", f"{d_in}->{d_out}", layer.lora_variant.name, f"{n:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    adapter = {id(t) for _, layer in layers for t in lora_tensors(layer).values()}
    base = sum(p.numel() for p in root.parameters() if id(p) not in adapter)
    lines.append(f"{len(layers)} layers, {total:,} trainable adapter params = {100 * total / max(base, 1):.4f}% "
                 f"of {base:,} base params")
    return "\n".join(lines + _structure(root, {n for n, _ in layers}))


def _structure(root: nn.Module, adapted: set[str]) -> list[str]:
    """The lines under the table: widths, pattern hits, heads left out, what cannot be adapted."""
    scopes = widths(root)
    lines = ["roles judged against width " + ", ".join(f"{w} ({p or 'the model'})" for p, w in scopes.items())]
    for pattern, hits in root.__dict__.get(HITS, {}).items():
        shown = ", ".join(hits[:3]) + (", ..." if len(hits) > 3 else "")
        lines.append(f"target_names {pattern!r} matched {len(hits)}: {shown}")
    left = {n: why for n, why in heads(root).items() if n not in adapted}
    if left:
        lines.append("heads left out (name them in target_names to adapt): "
                     + ", ".join(f"{n} ({why})" for n, why in left.items()))
    groups = Counter((BLOCK_INDEX.sub(lambda m: m.group(0).replace(m.group(1), "*"), u.name, count=1), u.kind)
                     for u in unadaptable(root))
    if groups:
        lines.append("not adaptable:")
        lines += [f"  {name} ({kind})" + (f" x{n}" if n > 1 else "") for (name, kind), n in list(groups.items())[:30]]
        if len(groups) > 30:
            lines.append(f"  ... and {len(groups) - 30} more kinds")
    return lines
