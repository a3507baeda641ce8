from .daformer import DAFormerHead
from .deeplabv2 import DeepLabV2Head
from .multi_scale_se import MultiScaleSEHead
from .segformer import SegFormerHead

__all__ = ["DAFormerHead", "DeepLabV2Head", "MultiScaleSEHead", "SegFormerHead"]
