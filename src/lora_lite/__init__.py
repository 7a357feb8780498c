"""lora-lite: small, exact, fast adapters for PyTorch, attached with forward hooks.

    import lora_lite as ll
    handle = ll.attach(model, ll.LoRAConfig(r=8, alpha=16))
"""
__version__ = "0.1.0"

from .adapter import (Handle, adapted_layers, attach, attached, detach, load, merge, read,  # noqa: E402
                      save, set_step, summary, track_steps)
from .config import AdapterConfig, from_dict  # noqa: E402
from .variant import REGISTRY, ParamSpec, register  # noqa: E402
from .variants.lora import LoRAConfig  # noqa: E402
from .variants.delora import DeLoRAConfig  # noqa: E402
from .variants.pissa import PiSSAConfig  # noqa: E402
from .variants.gralora import GraLoRAConfig  # noqa: E402
from .variants.singlora import SingLoRAConfig  # noqa: E402

__all__ = [
    "AdapterConfig", "Handle", "LoRAConfig", "ParamSpec", "REGISTRY", "adapted_layers", "attach", "attached",
    "detach", "from_dict", "load", "merge", "read", "register", "save", "set_step", "summary", "track_steps",
    "DeLoRAConfig", "PiSSAConfig", "GraLoRAConfig", "SingLoRAConfig",
]
