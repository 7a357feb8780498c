"""One file per variant; importing this package registers them all."""
from . import lora  # noqa: F401
from . import delora, pissa  # noqa: F401
from . import gralora, singlora  # noqa: F401
