from .daformer import DAFormerHead
from .deeplabv2 import DeepLabV2Head
from .segformer import SegFormerHead

__all__ = ["DAFormerHead", "DeepLabV2Head", "SegFormerHead"]
