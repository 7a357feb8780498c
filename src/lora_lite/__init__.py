"""lora-lite: small, exact, fast adapters for PyTorch, attached with forward hooks.

    import lora_lite as ll
    handle = ll.attach(model, ll.LoRAConfig(r=8, alpha=16))
"""
from .adapter_file import read, save
from .config import AdapterConfig, from_dict
from .disable import disabled
from .lifecycle import Handle, attach, attached, detach
from .loader import load
from .merge import merge
from .peft_export import export_peft
from .schedule import set_step, track_steps
from .state import adapted_layers
from .summary import summary
from .swap import swap
from .variant import REGISTRY, ParamSpec, Variant, register
from .variants.delora import DeLoRAConfig
from .variants.gralora import GraLoRAConfig
from .variants.lora import LoRAConfig
from .variants.pissa import PiSSAConfig
from .variants.singlora import SingLoRAConfig
from .version import __version__

__all__ = [
    "AdapterConfig", "Handle", "LoRAConfig", "ParamSpec", "REGISTRY", "Variant", "adapted_layers", "attach",
    "attached", "detach", "disabled", "export_peft", "from_dict", "load", "merge", "read", "register", "save",
    "set_step", "summary", "swap", "track_steps", "DeLoRAConfig", "PiSSAConfig", "GraLoRAConfig", "SingLoRAConfig",
    "__version__",
]
