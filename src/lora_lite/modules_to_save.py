"""`modules_to_save`: whole modules (a task head, `lm_head` for new tokens, a norm) trained fully beside the
adapter, PEFT's field of the same name.

Attach makes their parameters trainable and keeps a copy of their values; save writes their state_dict
under full keys; load checks and restores them; detach copies the originals back (bit for bit) and merge
keeps the trained values. A module tied to another (an `lm_head` sharing the embedding's weight) is refused:
training it would change the other module too, and detach could not give both back.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .adapter_file import listing
from .anatomy import Target
from .config import AdapterConfig
from .state import ORIGINALS, full_key, saved_modules
from .target import matches

EXCHANGED = "lora_originals_live"  # on the root, inside ll.disabled: the originals are in the modules


def _tied(root: nn.Module, path: str) -> list[str]:
    owners = defaultdict(list)
    for name, p in root.named_parameters(remove_duplicate=False):
        owners[id(p)].append(name)
    inside = {id(p) for p in root.get_submodule(path).parameters()}
    return sorted({n for i in inside for n in owners[i] if not n.startswith(f"{path}.")})


def find(root: nn.Module, cfg: AdapterConfig, targets: list[Target]) -> dict[str, nn.Module]:
    """{path: module} that `cfg.modules_to_save` names (plain names match whole trailing path parts, as
    `target_names` do; the outermost module hit). Errors name the entry: matching nothing, holding an
    adapted layer, or tied to a module outside it."""
    found = {}
    for entry in cfg.modules_to_save:
        hits = [n for n, _ in root.named_modules() if n and matches(entry, n)]
        hits = [n for n in hits if not any(n.startswith(f"{h}.") for h in hits)]
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of this model")
        found.update({n: root.get_submodule(n) for n in hits})
    for path in found:
        inner = [t.name for t in targets if t.name == path or t.name.startswith(f"{path}.")]
        if inner:
            raise ValueError(f"modules_to_save {path!r} holds adapted layers ({listing(inner, 5)}): a module is "
                             f"either trained whole or adapted; exclude it from the targets (exclude_names)")
        tied = _tied(root, path)
        if tied:
            raise ValueError(f"modules_to_save {path!r} is tied to {listing(tied, 5)} (shared weights, e.g. an "
                             f"lm_head tied to the input embedding): training it would change both. Untie it "
                             f"first (model.config.tie_word_embeddings=False and a copy of the weight)")
    return found


def values(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every tensor of the modules' state_dicts, by full key."""
    return {full_key(path, k): v for path, m in modules.items() for k, v in m.state_dict().items()}


def train(root: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Keep a copy of the modules' values (for detach) and make their parameters trainable."""
    root.__dict__[ORIGINALS] = {path: {k: v.detach().clone() for k, v in m.state_dict().items()}
                                for path, m in modules.items()}
    for m in modules.values():
        m.requires_grad_(True)


def fill(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, v in values(modules).items():
            v.copy_(tensors[key])


def exchange(root: nn.Module) -> None:
    """Swap the modules' live values with the kept originals (`ll.disabled`: twice gives them back).

    `.data` is swapped, not copied: a graph recorded before (a policy pass, then the reference pass under
    `ll.disabled`, then backward) sees no in-place change of a tensor it saved."""
    for path, m in saved_modules(root).items():
        kept = root.__dict__[ORIGINALS][path]
        for k, v in m.state_dict(keep_vars=True).items():
            v.data, kept[k] = kept[k], v.data
    root.__dict__[EXCHANGED] = not root.__dict__.get(EXCHANGED, False)


def restore(root: nn.Module) -> None:
    """Copy the original values back into the modules; then forget them."""
    if root.__dict__.pop(EXCHANGED, False):  # a detach inside ll.disabled: the originals are live already
        exchange(root)
        root.__dict__.pop(EXCHANGED, None)
    with torch.no_grad():
        for path, m in saved_modules(root).items():
            for k, v in m.state_dict().items():
                v.copy_(root.__dict__[ORIGINALS][path][k])
    root.__dict__.pop(ORIGINALS, None)


def split(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], path: str):
    """(adapter tensors, module tensors) of a file's tensors; the module ones checked: all present, same shape,
    same kind of dtype, finite. The error names the keys."""
    live = values(modules)
    missing = [k for k in live if k not in tensors]
    wrong = [f"{k}: file {tuple(tensors[k].shape)} {tensors[k].dtype} vs model {tuple(v.shape)} {v.dtype}"
             for k, v in live.items() if k in tensors and (tensors[k].shape != v.shape
                                                           or tensors[k].is_floating_point() != v.is_floating_point())]
    bad = [k for k, v in live.items() if k in tensors and not wrong and v.is_floating_point()
           and not bool(tensors[k].isfinite().all())]
    problems = [f"{what}: {listing(keys)}" for what, keys in (("missing modules_to_save keys", missing),
                                                              ("wrong modules_to_save tensors", wrong),
                                                              ("non-finite modules_to_save values", bad)) if keys]
    if problems:
        raise ValueError(f"{path} does not fit this model: " + "; ".join(problems))
    return {k: v for k, v in tensors.items() if k not in live}, {k: tensors[k] for k in live}
