"""Building blocks of DeepSC-COVID (paper Sec. IV-B..D), all 3D, GroupNorm + ReLU.

GroupNorm has no running statistics, so every block behaves identically in train and eval mode
(the reference code forced BatchNorm into training mode at test time). Convolutions that feed a
normalisation have no bias (the normalisation would cancel it).
"""

from __future__ import annotations

import torch
from torch import nn

INCEPTION_GROUPS = 2
"""GroupNorm groups of the inception block (MODEL_FACTS: GroupNorm with 2 groups)."""


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_groups(channels: int, groups: int, name: str) -> None:
    if channels % groups:
        raise ValueError(f"{name} ({channels}) must be divisible by the GroupNorm groups ({groups})")


def conv_norm_act(in_ch: int, out_ch: int, groups: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv3d (same padding, no bias) -> GroupNorm(groups) -> ReLU.

    ``(B, in_ch, D, H, W) -> (B, out_ch, ceil(D/stride), ceil(H/stride), ceil(W/stride))``.
    """
    _check_positive(in_ch=in_ch, out_ch=out_ch, groups=groups, kernel=kernel, stride=stride)
    _check_groups(out_ch, groups, "out_ch")
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.GroupNorm(groups, out_ch),
        nn.ReLU(inplace=True),
    )


class Inception3d(nn.Module):
    """The paper's 3D inception block: four branches at stride 2, concatenated, GroupNorm(2), ReLU.

    Branch widths are MODEL_FACTS' (8, 8, 12, 4) of 32 output channels scaled by ``out_ch / 32``
    (exact at ``out_ch = 32``); the 1x1x1 reductions have ``out_ch / 4`` channels. A ReLU follows
    each inner conv of a branch (as in 2D inception); the branch outputs are normalised together.

    1. 1x1x1 conv, stride 2
    2. 1x1x1 conv -> ReLU -> 3x3x3 conv, stride 2
    3. 1x1x1 conv -> ReLU -> 3x3x3 conv, stride 2 -> ReLU -> 3x3x3 conv
    4. 3x3x3 average pool, stride 1 -> 3x3x3 conv, stride 2

    ``(B, in_ch, D, H, W) -> (B, out_ch, ceil(D/2), ceil(H/2), ceil(W/2))``.
    """

    def __init__(self, in_ch: int = 1, out_ch: int = 32) -> None:
        super().__init__()
        _check_positive(in_ch=in_ch, out_ch=out_ch)
        if out_ch % 8:
            raise ValueError(f"inception out_ch must be a multiple of 8 (branches 8/8/12/4 of 32), got {out_ch}")
        unit = out_ch // 8
        reduce = 2 * unit
        widths = (2 * unit, 2 * unit, 3 * unit, unit)
        self.branch1 = nn.Conv3d(in_ch, widths[0], 1, stride=2, bias=False)
        self.branch2 = nn.Sequential(
            nn.Conv3d(in_ch, reduce, 1),
            nn.ReLU(inplace=True),
            nn.Conv3d(reduce, widths[1], 3, stride=2, padding=1, bias=False),
        )
        self.branch3 = nn.Sequential(
            nn.Conv3d(in_ch, reduce, 1),
            nn.ReLU(inplace=True),
            nn.Conv3d(reduce, widths[2], 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(widths[2], widths[2], 3, padding=1, bias=False),
        )
        self.branch4 = nn.Sequential(
            nn.AvgPool3d(3, stride=1, padding=1, count_include_pad=False),
            nn.Conv3d(in_ch, widths[3], 3, stride=2, padding=1, bias=False),
        )
        self.norm = nn.GroupNorm(INCEPTION_GROUPS, out_ch)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return self.act(self.norm(torch.cat(branches, dim=1)))


def plain_stem(in_ch: int = 1, out_ch: int = 32) -> nn.Sequential:
    """Inception ablation: one 3x3x3 conv with the same stride (2) and output channels, then the
    same GroupNorm(2) + ReLU, so only the multi-branch structure differs."""
    return conv_norm_act(in_ch, out_ch, INCEPTION_GROUPS, kernel=3, stride=2)


class ResidualEncoderUnit(nn.Module):
    """Residual 3D encoder unit at stride 2 (classification subnet).

    ``conv3 s2 -> GN -> ReLU -> conv3 -> GN`` plus a ``conv1 s2 -> GN`` shortcut, summed, ReLU.
    ``(B, in_ch, D, H, W) -> (B, out_ch, ceil(D/2), ceil(H/2), ceil(W/2))``.
    """

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        _check_positive(in_ch=in_ch, out_ch=out_ch, groups=groups)
        _check_groups(out_ch, groups, "out_ch")
        self.body = nn.Sequential(
            nn.Conv3d(in_ch, out_ch, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(groups, out_ch),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_ch),
        )
        self.shortcut = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride=2, bias=False), nn.GroupNorm(groups, out_ch))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def down_unit(in_ch: int, out_ch: int, groups: int) -> nn.Sequential:
    """U-Net down-transition unit: two ``conv3 -> GN -> ReLU`` at stride 1 (pooling is outside).

    ``(B, in_ch, D, H, W) -> (B, out_ch, D, H, W)``.
    """
    return nn.Sequential(conv_norm_act(in_ch, out_ch, groups), conv_norm_act(out_ch, out_ch, groups))


class UpUnit(nn.Module):
    """U-Net up-transition unit: stride-2 transposed conv ``in_ch -> out_ch``, concatenation with
    the skip features (``skip_ch`` channels at twice the resolution), two ``conv3 -> GN -> ReLU``.

    ``x (B, in_ch, D, H, W)``, ``skip (B, skip_ch, 2D, 2H, 2W)`` -> ``(B, out_ch, 2D, 2H, 2W)``.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        _check_positive(in_ch=in_ch, skip_ch=skip_ch, out_ch=out_ch, groups=groups)
        self.up = nn.ConvTranspose3d(in_ch, out_ch, 2, stride=2)
        self.convs = down_unit(out_ch + skip_ch, out_ch, groups)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        if up.shape[2:] != skip.shape[2:]:
            raise ValueError(f"up-sampled features {tuple(up.shape[2:])} do not match the skip {tuple(skip.shape[2:])}")
        return self.convs(torch.cat([up, skip], dim=1))
