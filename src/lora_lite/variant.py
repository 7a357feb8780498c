"""The variant contract: ParamSpec, the Variant base class, the registry, and the math variants share.

A variant is a subclass of `Variant` made of static methods (no state): `param_specs` and `forward` are
required; `init`, `group_init`, `delta_weight`, `lora_factors`, `on_step`, `on_schedule`, `dead_reason` and
`check_tensors` have defaults here, so the runtime calls every contract point on every variant without probing
for it. Its tensors live on the target layer as `lora_*` parameters and buffers (docs/design.md).

`forward(layer, x, y)` gets x and y in the adapter's dtype and returns the new output. It may write into y:
nothing else holds it (the hook copies it when another hook saw it first), which `add_low_rank` uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import CONFIGS, AdapterConfig
from .low_rank import add_low_rank  # noqa: F401  (variants import the shared math from here)


@dataclass(frozen=True)
class ParamSpec:
    """Shape and in-place initialiser of one adapter tensor.

    `init(t)` fills `t` in place (None leaves zeros, for tensors that the
    variant's `init` computes). `dtype` None means the config's adapter dtype.
    """

    shape: tuple[int, ...]
    init: Callable[[torch.Tensor], object] | None = None
    trainable: bool = True
    as_buffer: bool = False
    dtype: torch.dtype | None = None


class Variant:
    """The contract with its defaults. Subclass it, set `name` and `config`, and decorate with `@register`."""

    name: str = ""
    config: type[AdapterConfig] = AdapterConfig

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg) -> dict[str, ParamSpec]:
        raise NotImplementedError

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def init(layer: nn.Module, cfg) -> None:
        """Fill the layer's tensors beyond their ParamSpec init; may read the base weight (weights.py)."""

    @staticmethod
    def group_init(model: nn.Module, targets: list, cfg, calibration_data) -> None:
        """Data-calibrated init over all targets at once (calibration.capture_inputs helps)."""

    @staticmethod
    def delta_weight(layer: nn.Module) -> torch.Tensor:
        """The dense (d_out, d_in) update, for merge: s B′ A′ from lora_factors unless the variant has its own."""
        variant = layer.lora_variant
        if variant.lora_factors is Variant.lora_factors:
            raise TypeError(f"variant {variant.name} has no delta_weight (nor lora_factors): it cannot be merged")
        A, B, s = variant.lora_factors(layer)
        return s * (B @ A)

    @staticmethod
    def lora_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The update as one plain LoRA: (A′ (r′, d_in), B′ (d_out, r′), s) with s B′ A′ = ΔW, for ll.export_peft."""
        raise TypeError(f"variant {layer.lora_variant.name} has no lora_factors: it cannot be exported as a LoRA")

    @staticmethod
    def on_step(layer: nn.Module, step: int | None) -> None:
        """The training step: an int sets it, None advances it by one (after an optimizer step)."""

    @staticmethod
    def on_schedule(layer: nn.Module) -> None:
        """The user now drives the step (ll.track_steps or ll.set_step)."""

    @staticmethod
    def dead_reason(layer: nn.Module) -> str | None:
        """After init: why this layer's adapter can never learn (e.g. it read an all-zero weight), else None."""
        return None

    @staticmethod
    def check_tensors(tensors: dict[str, torch.Tensor], cfg) -> list[str]:
        """Invariants of one layer's tensors read from a file: the names of those that break them."""
        return []


REGISTRY: dict[str, type[Variant]] = {}


def register(cls: type) -> type:
    """Class decorator: add a Variant subclass to REGISTRY and tie its config class to its name."""
    if not (isinstance(cls, type) and issubclass(cls, Variant)):
        raise TypeError(f"{getattr(cls, '__name__', cls)!r} must subclass lora_lite.Variant")
    for attr in ("param_specs", "forward"):
        if getattr(cls, attr) is getattr(Variant, attr):
            raise TypeError(f"variant {cls.__name__} lacks required method {attr!r}")
    if not cls.name or not (isinstance(cls.config, type) and issubclass(cls.config, AdapterConfig)):
        raise TypeError(f"variant {cls.__name__} needs a name and a config subclassing AdapterConfig")
    cls.config.variant = cls.name
    REGISTRY[cls.name] = cls
    CONFIGS[cls.name] = cls.config
    return cls


def zeros(t: torch.Tensor) -> None:
    nn.init.zeros_(t)


def kaiming(t: torch.Tensor) -> None:
    """What nn.Linear does to its weight: uniform with bound 1/sqrt(fan_in), fan_in = t.shape[1]."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def dropout(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The config's input dropout; returns x itself (no copy) when p is 0 or in eval mode."""
    p = layer.lora_config.dropout
    return F.dropout(x, p, True) if p and layer.training else x


@dataclass
class ScaledConfig(AdapterConfig):
    """A config scaled as LoRA is: s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv 2312.03732)."""

    use_rslora: bool = False

    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
