"""Adapter configuration: one dataclass per variant, all sharing `AdapterConfig`.

Configs travel inside saved adapter files as JSON, so `from_dict` accepts only
known fields of registered variants and maps dtype names through a fixed table:
nothing read from a file is ever evaluated, imported or looked up with getattr.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

ROLES = ("reader", "writer", "inner")

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

CONFIGS: dict[str, type["AdapterConfig"]] = {}  # variant name -> config class, filled by @register
INT64_MAX = 2**63 - 1  # every int field ends up in an int64 tensor or index: larger values overflow later


@dataclass
class AdapterConfig:
    """Fields every variant shares. `variant` is set on each subclass by `@register`.

    Selection (see `target.py`): the default takes every reader and writer of the residual stream,
    judged per sub-model. `target_names` / `exclude_names` entries made only of identifier characters
    and dots match a whole trailing part of the module path, as PEFT's `target_modules` list does
    (`"q"` matches `...SelfAttention.q`, `"self_attn.q_proj"` matches `model.layers.0.self_attn.q_proj`);
    any other entry is a regex searched in the path (`r"\\.(q|v)_proj$"`). `exclude_names` adds to the
    default exclusions (embeddings, output and task heads: `lm_head`, `classifier`, `score`, ...);
    a head that a `target_names` entry matches is selected. `layers` are block indices: the outermost
    `layers.N` / `layer.N` / `h.N` / `block.N` / `blocks.N` in the path.
    """

    variant: ClassVar[str] = ""

    r: int = 8
    alpha: float = 16.0
    dtype: torch.dtype = torch.float32
    dropout: float = 0.0
    target_roles: tuple[str, ...] = ("reader", "writer")  # () means every role
    target_names: tuple[str, ...] = ()  # plain path tails or regexes; any may match, each must match something
    exclude_names: tuple[str, ...] = ()  # added to the default exclusions (heads, embeddings)
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.dtype, str):
            self.dtype = _dtype(self.dtype)
        if self.dtype not in DTYPES.values():
            raise TypeError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        self._check_ints()
        check_int("r", self.r, 1)
        check_number("alpha", self.alpha)
        check_number("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("target_roles", "target_names", "exclude_names"):
            value = getattr(self, name)
            if isinstance(value, str):  # a bare string would iterate as characters
                value = (value,)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name} must be a tuple of strings, got {value!r}")
            setattr(self, name, tuple(value))
        for name in ("target_names", "exclude_names"):
            for pattern in getattr(self, name):
                if not pattern:  # as a regex it would match every module
                    raise ValueError(f"{name} has an empty pattern; remove it")
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{name} pattern {pattern!r} is not a valid regex: {e}") from None
        bad = [r for r in self.target_roles if r not in ROLES]
        if bad:
            raise ValueError(f"target_roles {bad} unknown; choose from {ROLES}")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = (self.layers,)
            self.layers = tuple(self.layers)
            if any(isinstance(i, bool) or not isinstance(i, int) for i in self.layers):
                raise TypeError(f"layers must be ints, got {self.layers!r}")

    def _check_ints(self) -> None:
        """Every int field of every variant's config is an int in [0, 2**63 - 1] (None where allowed)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hints[f.name] in (int, int | None) and not (value is None and hints[f.name] is not int):
                check_int(f.name, value, 0)
            if hints[f.name] is bool and not isinstance(value, bool):
                raise TypeError(f"{f.name} must be True or False, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {"variant": self.variant}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.dtype):
                value = str(value).removeprefix("torch.")
            elif isinstance(value, tuple):
                value = list(value)
            d[f.name] = value
        return d


def check_int(name: str, value: Any, minimum: int, maximum: int = INT64_MAX) -> None:
    """Raise unless `value` is an int (a bool is not) in [minimum, maximum]; the message names the field."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        big = isinstance(value, int) and value.bit_length() > 64  # str() of a 5,000-digit int raises
        shown = f"an int of {value.bit_length()} bits" if big else repr(value)[:80]
        raise ValueError(f"{name} must be an int in [{minimum}, {maximum}], got {shown}")


def check_number(name: str, value: Any) -> None:
    """Raise unless `value` is a finite int or float (a string from a hand-edited file would fail much later)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise TypeError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from `to_dict` output (e.g. JSON metadata of a saved file)."""
    if not isinstance(d, dict):
        raise TypeError(f"config must be a dict, got {type(d).__name__}")
    d = dict(d)
    name = d.pop("variant", None)
    if not isinstance(name, str) or name not in CONFIGS:
        raise ValueError(f"unknown variant {name!r:.80}; registered: {sorted(CONFIGS)}")
    cls = CONFIGS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for variant {name!r}; known: {sorted(known)}")
    if "dtype" in d and not isinstance(d["dtype"], str):
        raise TypeError(f"dtype must be a string name, got {d['dtype']!r}")
    for key in ("target_roles", "target_names", "exclude_names", "layers"):
        if isinstance(d.get(key), list):
            d[key] = tuple(d[key])
    return cls(**d)
