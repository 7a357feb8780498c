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
from dataclasses import dataclass, field
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
PLAIN = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")  # a module path, or its tail: no regex syntax
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
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module name or pattern -> r (PEFT's meaning)
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module name or pattern -> alpha
    modules_to_save: tuple[str, ...] = ()  # whole modules trained beside the adapter (modules_to_save.py)

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
        for name in ("target_roles", "target_names", "exclude_names", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, str):  # a bare string would iterate as characters
                value = (value,)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name} must be a tuple of strings, got {value!r}")
            setattr(self, name, tuple(value))
        self._check_patterns()
        for name in ("target_names", "exclude_names", "modules_to_save"):
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

    def _check_patterns(self) -> None:
        for name, check in (("rank_pattern", lambda k, v: check_int(k, v, 1)), ("alpha_pattern", check_number)):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict) or not all(isinstance(k, str) and k for k in pattern):
                raise TypeError(f"{name} must be a dict of module names or patterns to numbers, got {pattern!r:.200}")
            for key, value in pattern.items():
                check(f"{name}[{key!r:.80}]", value)
                if not PLAIN.fullmatch(key):
                    try:
                        re.compile(key)
                    except re.error as e:
                        raise ValueError(f"{name} key {key!r:.80} is not a valid regex: {e}") from None

    def for_layer(self, name: str) -> "AdapterConfig":
        """This config with the r and alpha that `rank_pattern` / `alpha_pattern` give the module `name`.

        PEFT's rule (`get_pattern_key`): the first key, in order, that matches the end of the path after a
        dot. A plain key (identifier characters and dots) is compared as whole path parts, never run as a
        regex, so the exact names a saved file records are safe to match."""
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, name), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, name), self.alpha)
        return self if (r, alpha) == (self.r, self.alpha) else dataclasses.replace(self, r=r, alpha=alpha)

    def resolved(self, names: list[str]) -> "AdapterConfig":
        """This config with its patterns replaced by the exact module names whose r or alpha they change
        (what a file records: reloading it matches names, runs no pattern)."""
        layer = {n: self.for_layer(n) for n in names}
        ranks = {n: c.r for n, c in layer.items() if c.r != self.r}
        alphas = {n: c.alpha for n, c in layer.items() if c.alpha != self.alpha}
        return dataclasses.replace(self, rank_pattern=ranks, alpha_pattern=alphas)

    def check_patterns_used(self, names: list[str]) -> None:
        for field_name in ("rank_pattern", "alpha_pattern"):
            unused = [k for k in getattr(self, field_name) if not any(pattern_key([k], n) for n in names)]
            if unused:
                raise ValueError(f"{field_name} keys {unused} match no adapted layer (a typo?); adapted: {names[:10]}")

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


def pattern_key(keys, name: str) -> str | None:
    """The first of `keys` that names `name` (PEFT's `(.*\.)?(key)$`), or None."""
    for key in keys:
        if PLAIN.fullmatch(key):
            if key == name or name.endswith(f".{key}"):
                return key
        elif re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


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
    for key in ("target_roles", "target_names", "exclude_names", "layers", "modules_to_save"):
        if isinstance(d.get(key), list):
            d[key] = tuple(d[key])
    return cls(**d)
