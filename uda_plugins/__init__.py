"""uda_plugins: domain-adaptive semantic segmentation as Detectron2 plugins.

Importing the package registers every dataset, backbone, head and meta-architecture. Detectron2 names come from
:mod:`uda_plugins.d2` (real Detectron2 when installed, the builtin engine otherwise).
"""

from . import data, evaluation, methods, modeling  # noqa: F401  (registration)
from .config import add_uda_config, get_uda_cfg
from .d2 import BACKEND

__version__ = "0.1.0"
__all__ = ["add_uda_config", "get_uda_cfg", "BACKEND", "__version__"]
