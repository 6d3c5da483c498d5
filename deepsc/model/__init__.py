"""DeepSC-COVID network, losses, the patch <-> scan mapping and MONAI baselines.

The submodules import torch at their top, so this package imports none of them eagerly:
``import deepsc.model`` stays cheap, and ``from deepsc.model import DeepSC`` loads the network
on first use. Callers on a light path (CLI start-up) import inside their functions.

- :mod:`deepsc.model.coords`: ``box_to_grid``, ``paste_into_grid``, ``crop_from_grid``.
- :mod:`deepsc.model.blocks`: inception block, residual encoder unit, U-Net units.
- :mod:`deepsc.model.network`: ``ModelConfig``, ``DeepSC``.
- :mod:`deepsc.model.losses`: ``LossConfig``, ``total_loss`` (eq. 6-11).
- :mod:`deepsc.model.baselines`: MONAI UNet / DenseNet121 / ResNet-18 from params.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "deepsc.model.network",
    "DeepSC": "deepsc.model.network",
    "LossConfig": "deepsc.model.losses",
    "total_loss": "deepsc.model.losses",
    "class_weights_from_counts": "deepsc.model.losses",
    "box_to_grid": "deepsc.model.coords",
    "paste_into_grid": "deepsc.model.coords",
    "crop_from_grid": "deepsc.model.coords",
    "build_seg_baseline": "deepsc.model.baselines",
    "build_cls_baseline": "deepsc.model.baselines",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deepsc.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
