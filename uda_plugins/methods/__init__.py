"""One module per UDA method, each registering its meta-architecture."""

from .base import UDAMetaArch
from .dacs import DACS
from .duda import DUDA
from .mcl import MCL
from .quad_mix import QuadMix
from .self_training import SelfTrainingArch
from .source_only import SourceOnly
from .stal import STAL
from .target_only import TargetOnly

__all__ = ["UDAMetaArch", "SelfTrainingArch", "SourceOnly", "TargetOnly", "DACS", "QuadMix", "DUDA", "MCL", "STAL"]
