"""`ll.summary`: what is adapted, with role, shape, variant and trainable parameters, and what each
target_names pattern matched at attach (patterns are never re-run: a file's patterns are never run at all)."""
from __future__ import annotations

from torch import nn

from .state import HITS, adapted_layers, lora_tensors
from .target import candidates
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
    for pattern, hits in root.__dict__.get(HITS, {}).items():
        lines.append(f"target_names {pattern!r} matched {hits}")
    return "\n".join(lines)
