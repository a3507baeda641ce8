from .timm_backbone import TimmBackbone, build_dilated_resnet_backbone, build_mit_backbone, load_pretrained

__all__ = ["TimmBackbone", "build_dilated_resnet_backbone", "build_mit_backbone", "load_pretrained"]
