"""Single-task MONAI baselines with DeepSC-COVID's input conventions (paper Table II).

- Segmentation: MONAI ``UNet`` (3D, 1 -> 1 channel) on the patch ``(B, 1, pd, ph, pw)``,
  returning a pre-sigmoid logit of the same shape (like ``DeepSC`` ``seg_logit``).
- Classification: MONAI ``DenseNet121`` or ``resnet18`` (3D, 1 input channel, 3 classes) on the
  classification input ``(B, 1, N, Hc, Wc)``, returning ``(B, 3)`` logits.

Settings: ``baselines.unet_channels`` and ``baselines.classifier``, plus ``preprocess`` sizes
to reject shapes a network cannot take before training starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deepsc.errors import ConfigError

CLASSIFIERS = ("densenet121", "resnet18")
DENSENET_MIN_SIZE = 32  # stride-2 stem, max-pool and three transitions: /32 before the head
NUM_CLASSES = 3


def _section(params: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = params.get(name)
    if not isinstance(value, Mapping):
        raise ConfigError(f"params.yaml has no '{name}' section")
    return value


def build_seg_baseline(params: Mapping[str, Any]) -> nn.Module:
    """MONAI 3D UNet with ``baselines.unet_channels`` (stride 2 between levels, 2 residual units,
    instance norm: no running statistics, same behaviour in train and eval mode)."""
    from monai.networks.nets import UNet

    channels = _section(params, "baselines").get("unet_channels")
    if not isinstance(channels, (list, tuple)) or len(channels) < 2 or any(
        not isinstance(c, int) or c < 1 for c in channels
    ):
        raise ConfigError(f"baselines.unet_channels must be at least two positive integers, got {channels!r}")
    patch = _section(params, "preprocess").get("patch_size")
    factor = 2 ** (len(channels) - 1)
    if patch is not None and any(int(p) % factor for p in patch):
        raise ConfigError(f"patch_size {list(patch)} must be multiples of {factor} for a {len(channels)}-level UNet")
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
        norm="instance",
    )


def build_cls_baseline(params: Mapping[str, Any]) -> nn.Module:
    """MONAI 3D DenseNet121 or ResNet-18 (``baselines.classifier``), 1 channel in, 3 logits out.

    ``baselines.classifier_width`` scales every layer's channels (MONAI's ``widen_factor``;
    DenseNet's initial features and growth rate): 1 is the published network, 0.25 gives
    ResNet-18 units of 16..128 channels, the size of DeepSC's classification subnet, so a
    comparison at the default profile's budget is about the architecture, not its capacity.
    DenseNet121 down-samples by 32, so every dimension of the classification input
    (``cls_slices``, ``cls_size``) must be at least 32; use ``resnet18`` for smaller inputs.
    """
    from monai.networks.nets import DenseNet121, resnet18

    name = _section(params, "baselines").get("classifier")
    if name not in CLASSIFIERS:
        raise ConfigError(f"baselines.classifier must be one of {CLASSIFIERS}, got {name!r}")
    width = _section(params, "baselines").get("classifier_width", 1.0)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 4:
        raise ConfigError(f"baselines.classifier_width must be a number in (0, 4], got {width!r}")
    if name == "resnet18":
        return resnet18(spatial_dims=3, n_input_channels=1, num_classes=NUM_CLASSES, widen_factor=float(width))
    prep = _section(params, "preprocess")
    shape = (prep.get("cls_slices"), *(prep.get("cls_size") or ()))
    if any(isinstance(v, int) and v < DENSENET_MIN_SIZE for v in shape):
        raise ConfigError(
            f"densenet121 needs a classification input of at least {DENSENET_MIN_SIZE} voxels per axis, "
            f"got (cls_slices, cls_size) = {shape}; set baselines.classifier: resnet18 or enlarge the input"
        )
    return DenseNet121(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES,
                       init_features=max(1, round(64 * width)), growth_rate=max(1, round(32 * width)))


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
