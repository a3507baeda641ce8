from .daformer import DAFormerHead
from .deeplabv2 import DeepLabV2Head
from .deeplabv3plus import AuxiliaryHead, DeepLabV3PlusHead
from .multi_scale_se import MultiScaleSEHead
from .segformer import SegFormerHead

__all__ = ["AuxiliaryHead", "DAFormerHead", "DeepLabV2Head", "DeepLabV3PlusHead", "MultiScaleSEHead", "SegFormerHead"]
