"""One module per UDA method, each registering its meta-architecture."""

from .base import UDAMetaArch
from .source_only import SourceOnly
from .target_only import TargetOnly

__all__ = ["UDAMetaArch", "SourceOnly", "TargetOnly"]
