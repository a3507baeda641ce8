"""Dataset modules; importing this package registers the standard split names under ``$UDA_DATASETS``:

* ``synthetic_{source,target}_{train,val}`` — the embedded synthetic pair (generated on first use),
  ``synthetic_tiny_*``, a small variant for smoke runs and tests, and ``synthetic_v1_*``, the pair of generator
  version 1;
* ``cityscapes_{train,val}``, ``cityscapes_7cls_{train,val}``;
* ``gta5_train``, ``gta5_7cls_train``, ``synthia_train`` (and ``synthia_ilm_assl_ids_train``: ILM-ASSL's label ids);
* ``idd_{train,val}``, ``idd_7cls_{train,val}``, ``mapillary_{train,val}``, ``mapillary_7cls_{train,val}``.
"""

import os

from .cityscapes import load_cityscapes_semseg, prepare_cityscapes, register_cityscapes
from .common import datasets_root, register_sem_seg
from .gta5 import register_gta5
from .idd import register_idd
from .mapillary import register_mapillary
from .synthetic import (
    DEFAULT_SPEC,
    TINY_SPEC,
    VERSION_1_SPEC,
    SyntheticPairSpec,
    ensure_synthetic_pair,
    register_synthetic_pair,
)
from .synthia import register_synthia


def register_all(root: str) -> None:
    register_synthetic_pair("synthetic", DEFAULT_SPEC)
    register_synthetic_pair("synthetic_tiny", TINY_SPEC)
    register_synthetic_pair("synthetic_v1", VERSION_1_SPEC)
    register_cityscapes(os.path.join(root, "cityscapes"))
    register_gta5(os.path.join(root, "gta5"))
    register_synthia(os.path.join(root, "synthia"))
    register_idd(os.path.join(root, "idd"))
    register_mapillary(os.path.join(root, "mapillary"))


register_all(datasets_root())

__all__ = [
    "register_all",
    "register_sem_seg",
    "datasets_root",
    "load_cityscapes_semseg",
    "prepare_cityscapes",
    "register_cityscapes",
    "SyntheticPairSpec",
    "DEFAULT_SPEC",
    "TINY_SPEC",
    "ensure_synthetic_pair",
    "register_synthetic_pair",
]
