"""Datasets, label tables, transforms, the mapper and the UDA loaders. Importing registers the datasets."""

from . import datasets  # noqa: F401  (registration)
from .build import DataRequirements, build_test_loader, build_uda_train_loader, get_dataset_dicts
from .mapper import UDADatasetMapper
from .transforms import Geometry, apply_geometry, apply_geometry_tensor

__all__ = [
    "DataRequirements",
    "build_test_loader",
    "build_uda_train_loader",
    "get_dataset_dicts",
    "UDADatasetMapper",
    "Geometry",
    "apply_geometry",
    "apply_geometry_tensor",
]
