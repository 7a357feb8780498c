"""The lora-lite adapter file: one safetensors file, every `lora_*` tensor under its full module path, the
config (with the adapters' real dtype), the library version and the target list in the metadata.

`read` parses a file and executes nothing: the config is rebuilt from known fields of registered variants,
JSON is parsed with every failure mapped to a ValueError naming the file and the field, and only regular
files are opened (a FIFO would block). A folder holding a PEFT adapter is read by `peft_format`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import tempfile
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import AdapterConfig, from_dict
from .state import adapted_layers, full_key, lora_tensors, model_config, saved_modules
from .version import __version__
from .wrappers import unwrap

FORMAT = "lora-lite"
TEMP_STEM = 100  # bytes of the file name kept in the temp name: ".{stem}.{8 random}.tmp" stays < 255
KEY_SHOWN = 200  # characters of one key shown in an error (a crafted file's keys can be megabytes long)


def listing(keys, limit: int = 20) -> str:
    keys = sorted(k if len(k) <= KEY_SHOWN else k[:KEY_SHOWN] + "..." for k in keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (and modules_to_save value) by full key, copied to the CPU in one pass before
    anything is written, so a training thread that keeps updating the adapter cannot tear the file; FSDP2
    shards are gathered."""
    live = {full_key(name, k): v for name, layer in adapted_layers(model) for k, v in lora_tensors(layer).items()}
    live |= {full_key(path, k): v for path, m in saved_modules(unwrap(model)).items() for k, v in m.state_dict().items()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu", copy=True) for k, v in live.items()}


def file_config(model: nn.Module) -> AdapterConfig:
    """The config as a file records it: rank / alpha patterns and modules_to_save resolved to the exact module
    paths they hit, so a reload matches names and runs no pattern."""
    root = unwrap(model)
    resolved = model_config(root).resolved([n for n, _ in adapted_layers(root)])
    return dataclasses.replace(resolved, modules_to_save=tuple(saved_modules(root)))


def metadata(cfg: AdapterConfig, tensors: dict[str, torch.Tensor], targets: list[str]) -> dict[str, str]:
    d = cfg.to_dict()
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    if floats:  # after model.to(bfloat16) the adapters are bf16 whatever the config said: record what they are
        d["dtype"] = str(floats[0]).removeprefix("torch.")
    return {"format": FORMAT, "version": __version__, "config": json.dumps(d), "targets": json.dumps(targets)}


def write_atomic(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str) -> None:
    replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def replace_atomically(path: str, write: Callable[[str], object]) -> None:
    """`write(tmp)` to a short hidden temp name in the same folder, then rename: the old file stays whole."""
    folder = os.path.dirname(os.path.abspath(path))
    # hidden, and within a 255-byte name limit whatever the length (in bytes: UTF-8 names) of the file's own
    stem = os.path.basename(path).encode()[:TEMP_STEM].decode(errors="ignore")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=".tmp")
    except OSError as e:
        raise _named(e, path) from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, Exception):  # the OS's errors and safetensors' own (a full disk) name the user's path
            raise _named(e, path) from None
        raise


def _named(e: Exception, path: str) -> OSError:
    """The same kind of OSError (ENOSPC, EACCES: its errno and subclass kept), naming the path the user gave."""
    if isinstance(e, OSError) and e.errno is not None:
        return OSError(e.errno, f"cannot write {path}: {e.strerror or e}")
    return OSError(f"cannot write {path}: {e}")


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every adapter tensor (full-path keys) and the config to one safetensors file, atomically.

    Under FSDP2 (`fully_shard`: the tensors are DTensor shards) call it on every rank: it gathers
    the shards, a collective, and rank 0 writes the file.
    """
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("nothing to save: no adapter is attached to this model")
    path = _path(path)
    sharded = any(hasattr(v, "full_tensor") for _, layer in layers for v in lora_tensors(layer).values())
    tensors = snapshot(model)
    if sharded and torch.distributed.get_rank() != 0:
        return
    write_atomic(tensors, metadata(file_config(model), tensors, [n for n, _ in layers]), path)


def _path(path) -> str:
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise TypeError(f"path must be a str or os.PathLike naming a file, got {type(path).__name__} {path!r:.80}")
    return os.fspath(path)


def _json(path: str, meta: dict, field: str):
    try:
        return json.loads(meta[field])
    except (ValueError, RecursionError) as e:  # malformed, nested too deep, an int with too many digits
        raise ValueError(f"{path}: malformed metadata JSON in field {field!r}: {str(e)[:200]}") from None


def open_safetensors(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a regular safetensors file; anything else is a ValueError naming the path."""
    mode = os.stat(path).st_mode  # FileNotFoundError passes through as it is
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file (a folder, a FIFO or a device): give an adapter file")
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type on anything malformed
        raise ValueError(f"{path} is not a valid safetensors file: {str(e)[:200]}") from None


def read(path: str | os.PathLike) -> tuple[AdapterConfig, list[str], dict[str, torch.Tensor]]:
    """Parse an adapter file: (config, target module names, tensors by file key). Executes nothing."""
    path = _path(path)
    meta, tensors = open_safetensors(path)
    if "config" not in meta or "targets" not in meta:
        raise ValueError(f"{path} has no lora-lite metadata (config, targets): not a lora-lite adapter file")
    cfg_dict, names = _json(path, meta, "config"), _json(path, meta, "targets")
    if not isinstance(names, list) or not names or not all(isinstance(t, str) for t in names):
        raise ValueError(f"{path}: metadata 'targets' must be a non-empty list of module names (no target module to attach to)")
    try:
        cfg = from_dict(cfg_dict)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path}: {str(e)[:500]}") from None
    return cfg, names, tensors
