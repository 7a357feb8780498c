"""What is never a default target: output and task heads (left out unless named), and the weight-bearing parts
lora-lite cannot adapt at all (convolutions, fused expert tensors, bare weights used functionally, layers whose
parent bypasses their forward), each with the reason `ll.summary` and the errors give."""
from __future__ import annotations

from typing import NamedTuple

from torch import nn

from .weights import is_linear_like
from .wrappers import unwrap

# output and task heads by name (transformers' own: causal LM, sequence / token classification, QA);
# a path component equal to one of these marks a head
HEAD_NAMES = {"lm_head", "embed_out", "embed_tokens", "classifier", "score", "qa_outputs"}


class Unadaptable(NamedTuple):
    name: str  # module path, or module path + "." + parameter name for a bare parameter
    kind: str  # short label, e.g. "Conv2d", "fused MoE experts (4, 128, 32)"
    reason: str  # why lora-lite does not adapt it, as a sentence fragment


BYPASSED = ("its parent nn.MultiheadAttention uses its weight functionally and never calls its forward, "
            "so a hook on it would never run")
EXPERTS = "fused MoE expert parameters are not supported (adapt the attention and dense layers instead)"
CONV = "convolutions are not supported: lora-lite adapts linear-like layers"
BARE = "a bare parameter used functionally has no layer forward to hook"


def bypassed(model: nn.Module) -> set[str]:
    """Linear-like modules whose forward their parent never calls (nn.MultiheadAttention's out_proj)."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out |= {f"{name}.{c}" if name else c for c, child in m.named_children() if is_linear_like(child)}
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
    skipped = bypassed(model)
    out = []
    for name, m in model.named_modules():
        if is_linear_like(m):
            if name in skipped:
                out.append(Unadaptable(name, "bypassed by nn.MultiheadAttention", BYPASSED))
        elif isinstance(m, nn.modules.conv._ConvNd):
            out.append(Unadaptable(name, type(m).__name__, CONV))
        elif not isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            for pname, p in m.named_parameters(recurse=False):
                kind = _parameter_kind(m, pname, tuple(p.shape))
                if kind is not None:
                    out.append(Unadaptable(f"{name}.{pname}" if name else pname, *kind))
    return out


def heads(model: nn.Module) -> dict[str, str]:
    """{module path: why} of the output and task heads: not default targets (a fresh task head is trained
    whole, with modules_to_save; an output head is the embedding's twin). By structure: transformers'
    output embeddings, every linear outside `model.base_model`, a weight tied to an input embedding;
    by name: a path component in HEAD_NAMES."""
    model = unwrap(model)
    out = {}
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    output = call_method(model, "get_output_embeddings")
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


def call_method(model: nn.Module, method: str):
    get = getattr(model, method, None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None
