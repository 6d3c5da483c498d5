"""DeepSC-COVID: cross-task feature subnet, 3D lesion subnet, classification subnet (Sec. IV).

Scales (``p = patch_size = (pd, ph, pw)``, ``c = (N, Hc, Wc)`` the classification input):

==========================  ==================  ====================================
tensor                      grid                channels
==========================  ==================  ====================================
I_seg, F_seg (L-features)   p / 2               ``seg_widths[0]``
down 1 / 2 / 3              p / 2, p / 4, p / 8 ``seg_widths[1..3]``
S_1 (bottleneck head)       p / 8               1
S_2, S_3, S_4               p / 4, p / 2, p     1
I_cls, F_cls (C-features)   c / 2               ``seg_widths[0]``
encoder units e1 / e2 / e3  c / 4, c / 8, c / 16 ``cls_widths[0..2]``
==========================  ==================  ====================================

The inception stem halves the patch, the U-Net runs at p/2, p/4, p/8, and the last up unit
returns to full patch resolution (its skip input is the patch itself, as no encoder level
exists there). Hence patch dimensions must be multiples of 8 and classification dimensions
multiples of 16, so every grid divides its input evenly. (The stride-2 convolutions centre
output cell j on input cell 2j, not between cells 2j and 2j + 1 as :mod:`deepsc.model.coords`
assumes: after L of them a cell sits (2^L - 1) / 2 input voxels early; docs/architecture.md,
known limitations.)

Evidence masks pair by spatial scale, coarse with coarse: ``V_1 <- e3`` (on S_1's grid),
``V_2 <- e2`` (S_2), ``V_3 <- e1`` (S_3). The paper numbers both sets from 1, but its S_1 is
the coarsest segmentation scale and its e1 the finest encoder unit; pairing by scale keeps the
crop-and-resize of eq. 5 a mild one. Each V_i is the class activation map of its unit for the
true class (training, ``target`` given) or the predicted class, min-max normalised per sample
over the whole scan grid (so a patch far from the evidence reads near 0 instead of being
stretched to [0, 1]), then cropped at the patch box (:mod:`deepsc.model.coords`).

Every patch <-> scan meeting (cross-stitch both ways, S_hat into the classifier, evidence crops,
whole-scan inference) goes through :mod:`deepsc.model.coords`. Nothing in the joint path is
detached: the cls loss reaches the lesion subnet through S_hat and the cross-stitch; the seg
loss reaches the classification path's stem (its inception block, via the cross-stitch) but not
its encoder units, which the task-aware loss reaches through V_i (tests/test_model.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsc.errors import ConfigError, InputError
from deepsc.model.blocks import Inception3d, ResidualEncoderUnit, UpUnit, conv_norm_act, down_unit, plain_stem
from deepsc.model.coords import crop_from_grid, paste_into_grid, resize_to_scan

TASKS = ("joint", "seg", "cls")
NUM_CLASSES = 3
SEG_DIVISOR = 8  # inception /2, then two max-pools: S_1 at p / 8
CLS_DIVISOR = 16  # inception /2, then three stride-2 encoder units: e3 at c / 16
EVIDENCE_UNITS = (2, 1, 0)  # V_1..V_3 come from encoder units e3, e2, e1 (0-based index)

_MODEL_KEYS = {"inception", "cross_stitch", "cross_stitch_init", "seg_widths", "cls_widths", "seg_eta", "norm_groups"}


def _int_tuple(value: Any, length: int, name: str) -> tuple[int, ...]:
    try:
        result = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"model setting {name} must be a list of {length} integers, got {value!r}") from None
    if len(result) != length or any(v < 1 for v in result) or any(float(v) != float(r) for v, r in zip(value, result)):
        raise ConfigError(f"model setting {name} must be {length} positive integers, got {value!r}")
    return result


def _float_tuple(value: Any, length: int, name: str) -> tuple[float, ...]:
    try:
        result = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"model setting {name} must be a list of {length} numbers, got {value!r}") from None
    if len(result) != length:
        raise ConfigError(f"model setting {name} must have {length} values, got {value!r}")
    return result


@dataclass(frozen=True)
class ModelConfig:
    """Architecture settings (params.yaml ``model`` plus the input sizes from ``preprocess``).

    Attributes:
        patch_size: ``(pd, ph, pw)`` voxels of a segmentation patch; multiples of 8.
        cls_shape: ``(N, Hc, Wc)`` of the classification input; multiples of 16.
        inception: False replaces each inception block with one plain stride-2 conv (ablation).
        cross_stitch: False disables the exchange between the tasks (F = I, ablation).
        cross_stitch_init: initial ``(self, other)`` weights of eq. 2.
        seg_widths: ``(feature, down1, down2, down3)`` channels; ``feature`` is the width of
            both inception blocks (the paper's 32) and must be a multiple of 8.
        cls_widths: channels of the three residual encoder units (paper: 64, 128, 256).
        seg_eta: eq. 3 fusion weights of S_1..S_4.
        norm_groups: GroupNorm groups of the U-Net and the classification subnet.
    """

    patch_size: tuple[int, int, int] = (16, 64, 64)
    cls_shape: tuple[int, int, int] = (16, 64, 64)
    inception: bool = True
    cross_stitch: bool = True
    cross_stitch_init: tuple[float, float] = (0.9, 0.1)
    seg_widths: tuple[int, int, int, int] = (16, 32, 64, 128)
    cls_widths: tuple[int, int, int] = (16, 32, 64)
    seg_eta: tuple[float, float, float, float] = (0.25, 0.25, 0.5, 1.0)
    norm_groups: int = 4
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("patch_size", _int_tuple(self.patch_size, 3, "patch_size"))
        set_("cls_shape", _int_tuple(self.cls_shape, 3, "cls_shape"))
        set_("seg_widths", _int_tuple(self.seg_widths, 4, "seg_widths"))
        set_("cls_widths", _int_tuple(self.cls_widths, 3, "cls_widths"))
        set_("seg_eta", _float_tuple(self.seg_eta, 4, "seg_eta"))
        set_("cross_stitch_init", _float_tuple(self.cross_stitch_init, 2, "cross_stitch_init"))
        for name in ("inception", "cross_stitch"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model setting {name} must be true or false, got {getattr(self, name)!r}")
        if any(v % SEG_DIVISOR for v in self.patch_size):
            raise ConfigError(f"patch_size {self.patch_size} must be multiples of {SEG_DIVISOR} (S_1 is at 1/8)")
        if any(v % CLS_DIVISOR for v in self.cls_shape):
            raise ConfigError(
                f"classification input {self.cls_shape} (cls_slices, cls_size) must be multiples of {CLS_DIVISOR}"
            )
        if self.seg_widths[0] % 8:
            raise ConfigError(f"seg_widths[0] = {self.seg_widths[0]} (inception width) must be a multiple of 8")
        if not isinstance(self.norm_groups, int) or self.norm_groups < 1:
            raise ConfigError(f"model setting norm_groups must be a positive integer, got {self.norm_groups!r}")
        for width in self.seg_widths + self.cls_widths:
            if width % self.norm_groups:
                raise ConfigError(f"every width must be divisible by norm_groups={self.norm_groups}, got {width}")
        if any(e < 0 for e in self.seg_eta) or not any(e > 0 for e in self.seg_eta):
            raise ConfigError(f"seg_eta must be non-negative with at least one positive value, got {self.seg_eta}")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {self.num_classes}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ModelConfig":
        """Build from the merged params (sections ``model`` and ``preprocess``)."""
        model = params.get("model")
        prep = params.get("preprocess")
        if not isinstance(model, Mapping) or not isinstance(prep, Mapping):
            raise ConfigError("params need the 'model' and 'preprocess' sections")
        unknown = set(model) - _MODEL_KEYS
        if unknown:
            raise ConfigError(f"unknown model setting(s): {', '.join(sorted(unknown))}")
        try:
            cls_size = _int_tuple(prep["cls_size"], 2, "preprocess.cls_size")
            cls_shape = (int(prep["cls_slices"]), *cls_size)
            patch_size = prep["patch_size"]
        except KeyError as exc:
            raise ConfigError(f"preprocess setting {exc.args[0]} is missing") from None
        return cls(patch_size=patch_size, cls_shape=cls_shape, **dict(model))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``config.json`` beside a checkpoint)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(sorted(unknown))}")
        return cls(**dict(data))

    @property
    def feature_channels(self) -> int:
        """Width of I_seg, I_cls, F_seg, F_cls."""
        return self.seg_widths[0]

    def side_shapes(self, patch_size: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
        """Grids of S_1..S_4 for a patch (p/8, p/4, p/2, p)."""
        p = tuple(patch_size or self.patch_size)
        return [tuple(v // f for v in p) for f in (8, 4, 2, 1)]  # type: ignore[misc]


def minmax_per_sample(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each sample of ``(B, ...)`` to [0, 1] by its own min and max (constant -> 0).

    Differentiable (min and max pass gradients to the voxels that attain them).
    """
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    return (x - lo) / (hi - lo).clamp_min(eps)


class CrossStitch(nn.Module):
    """Eq. 2 with dimension matching: ``F_seg = w_seg1 I_seg + w_cls2 CROP(I_cls)``,
    ``F_cls = w_seg2 PASTE(I_seg) + w_cls1 I_cls``.

    The four scalars are explicit parameters initialised to ``(self, other)``: ``w_seg1 = w_cls1
    = self``, ``w_cls2 = w_seg2 = other``.
    """

    def __init__(self, init: Sequence[float] = (0.9, 0.1)) -> None:
        super().__init__()
        self_w, other_w = (float(v) for v in init)
        self.w_seg1 = nn.Parameter(torch.tensor(self_w))
        self.w_cls2 = nn.Parameter(torch.tensor(other_w))
        self.w_seg2 = nn.Parameter(torch.tensor(other_w))
        self.w_cls1 = nn.Parameter(torch.tensor(self_w))

    def mix_seg(self, i_seg: torch.Tensor, i_cls_matched: torch.Tensor) -> torch.Tensor:
        """``F_seg`` from I_seg and I_cls already cropped to the patch grid."""
        return self.w_seg1 * i_seg + self.w_cls2 * i_cls_matched

    def mix_cls(self, i_seg_matched: torch.Tensor, i_cls: torch.Tensor) -> torch.Tensor:
        """``F_cls`` from I_seg already pasted into the scan grid, and I_cls."""
        return self.w_seg2 * i_seg_matched + self.w_cls1 * i_cls

    def forward(self, i_seg: torch.Tensor, i_cls: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``i_seg (B, C, p/2)``, ``i_cls (B, C, c/2)``, ``box (B, 6)`` -> ``(F_seg, F_cls)``."""
        f_seg = self.mix_seg(i_seg, crop_from_grid(i_cls, box, i_seg.shape[2:]))
        f_cls = self.mix_cls(paste_into_grid(i_seg, box, i_cls.shape[2:])[0], i_cls)
        return f_seg, f_cls


class LesionSubnet(nn.Module):
    """Eq. 3: U-shaped 3D lesion subnet with four side outputs and their fusion.

    ``forward(f_seg (B, w0, p/2), patch (B, 1, p))`` -> ``(fused_logit (B, 1, p), [S_1..S_4])``
    where ``fused_logit = sum_i eta_i UP(S_i)`` (S_hat = sigmoid of it) and S_i are logits on
    the grids p/8, p/4, p/2, p. UP is trilinear (``align_corners=False``).
    """

    def __init__(self, widths: Sequence[int], eta: Sequence[float], groups: int) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.register_buffer("eta", torch.tensor([float(e) for e in eta]), persistent=False)
        self.down1 = down_unit(w0, w1, groups)
        self.down2 = down_unit(w1, w2, groups)
        self.down3 = down_unit(w2, w3, groups)
        self.pool = nn.MaxPool3d(2)
        self.up1 = UpUnit(w3, w2, w2, groups)
        self.up2 = UpUnit(w2, w1, w1, groups)
        self.up3 = UpUnit(w1, 1, w0, groups)  # full resolution: the skip is the patch itself
        self.heads = nn.ModuleList(nn.Conv3d(w, 1, 1) for w in (w3, w2, w1, w0))

    def forward(self, f_seg: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        d1 = self.down1(f_seg)
        d2 = self.down2(self.pool(d1))
        d3 = self.down3(self.pool(d2))
        u1 = self.up1(d3, d2)
        u2 = self.up2(u1, d1)
        u3 = self.up3(u2, patch)
        sides = [head(x) for head, x in zip(self.heads, (d3, u1, u2, u3))]
        size = patch.shape[2:]
        fused = sum(
            eta * (s if s.shape[2:] == size else F.interpolate(s, size=size, mode="trilinear", align_corners=False))
            for eta, s in zip(self.eta, sides)
        )
        return fused, sides


class ClassificationSubnet(nn.Module):
    """Eq. 4: lesion map and C-features, each through a conv, concatenated, three residual
    encoder units, GAP of all three, one FC.

    ``forward(f_cls (B, w0, c/2), lesion_map (B, 2, c/2))`` -> ``(logits (B, K), [e1, e2, e3])``.
    ``lesion_map`` holds S_hat pasted into the scan grid and its coverage (which cells the
    segmentation has seen), so "no lesion predicted" and "not looked at" differ.
    """

    LESION_CHANNELS = 2

    def __init__(self, feature_ch: int, widths: Sequence[int], groups: int, num_classes: int) -> None:
        super().__init__()
        self.lesion_conv = conv_norm_act(self.LESION_CHANNELS, feature_ch, groups)
        self.feature_conv = conv_norm_act(feature_ch, feature_ch, groups)
        ins = (2 * feature_ch, *widths[:-1])
        self.units = nn.ModuleList(ResidualEncoderUnit(i, o, groups) for i, o in zip(ins, widths))
        self.widths = tuple(widths)
        self.fc = nn.Linear(sum(widths), num_classes)

    def forward(self, f_cls: torch.Tensor, lesion_map: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = torch.cat([self.lesion_conv(lesion_map), self.feature_conv(f_cls)], dim=1)
        feats = []
        for unit in self.units:
            x = unit(x)
            feats.append(x)
        pooled = torch.cat([f.mean(dim=(2, 3, 4)) for f in feats], dim=1)
        return self.fc(pooled), feats

    def cams(self, feats: Sequence[torch.Tensor], class_index: torch.Tensor) -> list[torch.Tensor]:
        """Eq. 5 before CROP: per-unit class activation maps from the slices of the SAME FC weight.

        Returns ``[(B, 1, c/4), (B, 1, c/8), (B, 1, c/16)]`` for units e1..e3; the grid mean of
        map i is unit i's contribution to the logit of ``class_index`` (the FC bias excluded).
        """
        weight = self.fc.weight[class_index]  # (B, sum(widths))
        maps, start = [], 0
        for feat, width in zip(feats, self.widths):
            maps.append(torch.einsum("bc,bcdhw->bdhw", weight[:, start : start + width], feat).unsqueeze(1))
            start += width
        return maps


def _with_context(
    pasted: torch.Tensor, coverage: torch.Tensor, context: torch.Tensor | None, known: torch.Tensor | None, grid: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Complete a pasted lesion map outside its coverage from a whole-scan lesion map (training).

    Args:
        pasted, coverage: ``(B, 1, D, H, W)`` from :func:`paste_into_grid` (zeros: nothing pasted).
        context: ``(B, 1, N, Hc, Wc)`` lesion map on the cls input grid (stage-1 prediction or
            reference mask), or None.
        known: ``(B,)`` bool, whose context is known (None = all).
        grid: ``(D, H, W)`` of the C-features (the context is area-averaged onto it).

    Returns:
        ``(lesion, coverage)``, each ``(B, 1, D, H, W)``.
    """
    if context is None:
        return pasted, coverage
    if context.ndim != 5 or context.shape[0] != pasted.shape[0]:
        raise ValueError(f"lesion_context must be (B, 1, N, Hc, Wc), got {tuple(context.shape)}")
    pooled = nn.functional.adaptive_avg_pool3d(context.to(pasted.dtype), tuple(grid))
    weight = torch.ones(pasted.shape[0], device=pasted.device, dtype=pasted.dtype) if known is None else known.to(pasted.device, pasted.dtype).view(-1)
    outside = (1.0 - coverage) * weight.view(-1, 1, 1, 1, 1)
    return pasted + outside * pooled, coverage + outside


class DeepSC(nn.Module):
    """DeepSC-COVID (Wang et al., IEEE TMI 2021) with real patch <-> scan dimension matching.

    Inputs of :meth:`forward` (one scan per sample): ``cls (B, 1, N, Hc, Wc)`` in [0, 1],
    ``patch (B, 1, pd, ph, pw)`` in [0, 1] from the same preprocessed scan, ``box (B, 6)`` the
    patch's normalised box (:func:`deepsc.data.patches.normalized_box`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"DeepSC needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        width = config.feature_channels
        stem = Inception3d if config.inception else plain_stem
        self.seg_stem = stem(1, width)
        self.cls_stem = stem(1, width)
        self.cross_stitch = CrossStitch(config.cross_stitch_init) if config.cross_stitch else None
        self.lesion = LesionSubnet(config.seg_widths, config.seg_eta, config.norm_groups)
        self.classifier = ClassificationSubnet(width, config.cls_widths, config.norm_groups, config.num_classes)

    # ---------------------------------------------------------------- parameter groups
    def seg_parameters(self) -> list[nn.Parameter]:
        """Segmentation path: its inception block and the lesion subnet (stage-1 seg)."""
        return [*self.seg_stem.parameters(), *self.lesion.parameters()]

    def cls_parameters(self) -> list[nn.Parameter]:
        """Classification path: its inception block and the classification subnet (stage-1 cls)."""
        return [*self.cls_stem.parameters(), *self.classifier.parameters()]

    def cross_stitch_parameters(self) -> list[nn.Parameter]:
        """The four eq. 2 weights (empty when the cross-stitch is disabled)."""
        return [] if self.cross_stitch is None else list(self.cross_stitch.parameters())

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        cls: torch.Tensor | None,
        patch: torch.Tensor | None,
        box: torch.Tensor | None,
        task: str = "joint",
        target: torch.Tensor | None = None,
        lesion_context: torch.Tensor | None = None,
        context_known: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Run the paths of ``task``.

        Args:
            cls: ``(B, 1, N, Hc, Wc)``; unused (may be None) in task ``seg``.
            patch: ``(B, 1, pd, ph, pw)``; unused (may be None) in task ``cls``.
            box: ``(B, 6)`` normalised patch box; needed for ``joint`` and for evidence in ``cls``.
            task: ``joint`` (all subnets, cross-stitch), ``seg`` (seg path alone, no exchange) or
                ``cls`` (cls path alone, S_hat = 0 and coverage 0).
            target: ``(B,)`` true class indices; CAMs/evidence use them when given, else the
                predicted class.
            lesion_context: ``(B, 1, N, Hc, Wc)`` lesion map on the cls grid (the stage-1
                segmentation of the whole scan, or the reference mask), training only. The
                classifier's lesion input is S_hat over the whole scan; a training
                sample segments one patch, so the rest of the scan is filled from this map
                and the classifier sees whole-scan lesion maps in training as
                at inference (:meth:`infer_scan` pastes every patch). In task ``cls`` (stage-1
                pre-training, seg path untrained) the whole map comes from it.
            context_known: ``(B,)`` bool, samples whose lesion_context is known; the others keep
                coverage 0 outside the patch ("not looked at").

        Returns:
            dict with ``seg_logit`` ``(B, 1, pd, ph, pw)`` fused pre-sigmoid logit,
            ``seg_side`` [S_1..S_4] logits, ``cls_logit`` ``(B, K)``, ``evidence`` [V_1..V_3]
            ``(B, 1, S_i grid)`` in [0, 1], ``cams`` [e1, e2, e3] raw CAMs ``(B, 1, grid)`` on
            the scan grid, ``cam_class`` ``(B,)``. Keys of paths not run hold None / [].
        """
        self._check_forward_inputs(task, cls, patch, box)
        out: dict[str, Any] = dict(seg_logit=None, seg_side=[], cls_logit=None, evidence=[], cams=[], cam_class=None)

        if task == "seg":
            out["seg_logit"], out["seg_side"] = self.lesion(self.seg_stem(patch), patch)
            return out

        i_cls = self.cls_stem(cls)
        grid = i_cls.shape[2:]
        if task == "cls":
            f_cls = i_cls
            zeros = i_cls.new_zeros((i_cls.shape[0], 1, *grid))
            lesion_map = torch.cat(_with_context(zeros, zeros, lesion_context, context_known, grid), dim=1)
        else:
            i_seg = self.seg_stem(patch)
            if self.cross_stitch is None:
                f_seg, f_cls = i_seg, i_cls
            else:
                f_seg, f_cls = self.cross_stitch(i_seg, i_cls, box)
            out["seg_logit"], out["seg_side"] = self.lesion(f_seg, patch)
            pasted, coverage = paste_into_grid(torch.sigmoid(out["seg_logit"]), box, grid)
            lesion_map = torch.cat(_with_context(pasted, coverage, lesion_context, context_known, grid), dim=1)

        logits, feats = self.classifier(f_cls, lesion_map)
        out["cls_logit"] = logits
        out["cam_class"] = self._cam_class(logits, target)
        out["cams"] = self.classifier.cams(feats, out["cam_class"])
        if box is not None:
            self._check_box(box, logits.shape[0])
            shapes = self.config.side_shapes(patch.shape[2:] if patch is not None else None)
            out["evidence"] = [
                crop_from_grid(minmax_per_sample(out["cams"][unit]), box, shape)
                for unit, shape in zip(EVIDENCE_UNITS, shapes[:3])
            ]
        return out

    def _check_forward_inputs(
        self, task: str, cls: torch.Tensor | None, patch: torch.Tensor | None, box: torch.Tensor | None
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task in ("joint", "seg"):
            self._check_input(patch, "patch", SEG_DIVISOR)
        if task in ("joint", "cls"):
            self._check_input(cls, "cls", CLS_DIVISOR)
        if task == "joint":
            assert cls is not None and patch is not None  # checked above
            if patch.shape[0] != cls.shape[0]:
                raise ValueError(f"cls has batch size {cls.shape[0]} but patch has {patch.shape[0]}")
            self._check_box(box, cls.shape[0])

    @staticmethod
    def _cam_class(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        if target is None:
            return logits.argmax(dim=1)
        target = torch.as_tensor(target, device=logits.device).long().view(-1)
        if target.shape[0] != logits.shape[0]:
            raise ValueError(f"target has {target.shape[0]} labels for a batch of {logits.shape[0]}")
        if bool(((target < 0) | (target >= logits.shape[1])).any()):
            raise ValueError(f"target labels must lie in 0..{logits.shape[1] - 1}, got {target.tolist()}")
        return target

    @staticmethod
    def _check_input(x: torch.Tensor | None, name: str, divisor: int) -> None:
        if x is None or x.ndim != 5 or x.shape[1] != 1:
            shape = None if x is None else tuple(x.shape)
            raise ValueError(f"{name} must be a (B, 1, D, H, W) tensor, got {shape}")
        if any(v % divisor for v in x.shape[2:]):
            raise ValueError(f"{name} spatial shape {tuple(x.shape[2:])} must be multiples of {divisor}")

    @staticmethod
    def _check_box(box: torch.Tensor | None, batch: int) -> None:
        if box is None or box.ndim != 2 or box.shape != (batch, 6):
            raise ValueError(f"box must be ({batch}, 6), got {None if box is None else tuple(box.shape)}")

    # ---------------------------------------------------------------- whole-scan inference
    @torch.no_grad()
    def infer_scan(
        self,
        cls: torch.Tensor,
        image: torch.Tensor,
        patch_size: Sequence[int] | None = None,
        chunk_size: int = 4,
        with_evidence: bool = True,
        overlap: float = 0.0,
        evidence_class: int | None = None,
    ) -> dict[str, Any]:
        """Diagnose one whole preprocessed scan.

        The C-features are computed once; every non-overlapping patch
        (:func:`deepsc.data.patches.patch_grid`, edge patches zero-padded) runs through the seg
        path with the cross-stitch, ``chunk_size`` patches at a time. The seg -> cls exchange and
        the classifier's S_hat input are built from these patches pasted into the scan grid (the
        patches tile the scan, so coverage is 1 everywhere, as for the one patch of training).

        With ``overlap`` > 0 the lesion probability also comes from the overlapping patches of
        :func:`deepsc.data.patches.sliding_grid`, blended with a Gaussian weight (sliding-window
        inference); the classifier still sees the tiling patches only, so the class, its
        probabilities and the evidence maps do not depend on ``overlap`` (beyond float rounding:
        the patches are batched differently).

        Args:
            cls: ``(1, 1, N, Hc, Wc)`` classification input of the scan.
            image: ``(1, 1, Z, Y, X)`` preprocessed scan in [0, 1] (any Z, Y, X).
            patch_size: ``(pd, ph, pw)``; default the config's.
            chunk_size: patches per forward pass (bounds memory).
            with_evidence: also return the evidence maps at ``(Z, Y, X)`` (memory: 3 float32 volumes).
            overlap: fraction of a patch that neighbouring segmentation windows share, in [0, 1);
                0 = the non-overlapping grid alone (one forward pass per tile).
            evidence_class: the class whose CAMs the evidence maps show; None = the predicted one.

        Returns:
            ``lesion_prob`` float32 ``(Z, Y, X)`` in [0, 1]; ``class_prob`` float32 ``(K,)``;
            ``pred`` int; ``evidence`` [V_1..V_3] float32 ``(Z, Y, X)`` in [0, 1] (CAMs of the
            predicted class, or of ``evidence_class``, of units e3, e2, e1, min-max normalised
            over the scan) or [].
        """
        import numpy as np

        from deepsc.data.patches import (blend_patches, extract_patch, gaussian_importance, normalized_box, patch_grid,
                                         sliding_grid, stitch_patches)

        size = tuple(int(v) for v in (patch_size or self.config.patch_size))
        self._check_input(cls, "cls", CLS_DIVISOR)
        if image.ndim != 5 or image.shape[:2] != (1, 1) or cls.shape[0] != 1:
            raise ValueError(f"infer_scan takes one scan: image (1, 1, Z, Y, X), got {tuple(image.shape)}")
        if len(size) != 3 or any(v < 1 or v % SEG_DIVISOR for v in size):
            raise ValueError(f"patch_size must be three multiples of {SEG_DIVISOR}, got {size}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        device = next(self.parameters()).device
        shape = tuple(image.shape[2:])
        volume = image[0, 0].detach().float().cpu().numpy()
        tiles = patch_grid(shape, size)
        starts = sliding_grid(shape, size, overlap) if overlap else tiles
        is_tile = set(tiles)

        i_cls = self.cls_stem(cls.to(device))
        grid = i_cls.shape[2:]
        seg_to_cls = torch.zeros_like(i_cls)
        lesion_map = i_cls.new_zeros((1, ClassificationSubnet.LESION_CHANNELS, *grid))
        probs: list[np.ndarray] = []
        for first in range(0, len(starts), chunk_size):
            chunk = starts[first : first + chunk_size]
            patches = torch.from_numpy(np.stack([extract_patch(volume, s, size) for s in chunk])[:, None]).to(device)
            boxes = torch.tensor([normalized_box(s, size, shape) for s in chunk], dtype=i_cls.dtype, device=device)
            # the classifier's inputs come from the tiles only (all of the chunk without overlap)
            tile_rows = [i for i, s in enumerate(chunk) if s in is_tile]
            whole = len(tile_rows) == len(chunk)
            i_seg = self.seg_stem(patches)
            if self.cross_stitch is None:
                f_seg = i_seg
            else:
                scan_grid = i_cls.expand(len(chunk), *i_cls.shape[1:])
                f_seg = self.cross_stitch.mix_seg(i_seg, crop_from_grid(scan_grid, boxes, i_seg.shape[2:]))
                if tile_rows:
                    pasted = i_seg if whole else i_seg[tile_rows]
                    seg_to_cls += paste_into_grid(pasted, boxes if whole else boxes[tile_rows], grid)[0].sum(dim=0, keepdim=True)
            prob = torch.sigmoid(self.lesion(f_seg, patches)[0])
            if tile_rows:
                pasted = prob if whole else prob[tile_rows]
                lesion_map += torch.cat(paste_into_grid(pasted, boxes if whole else boxes[tile_rows], grid),
                                        dim=1).sum(dim=0, keepdim=True)
            probs.extend(prob[:, 0].float().cpu().numpy())

        f_cls = i_cls if self.cross_stitch is None else self.cross_stitch.mix_cls(seg_to_cls, i_cls)
        logits, feats = self.classifier(f_cls, lesion_map)
        class_prob = torch.softmax(logits.float(), dim=1)[0]
        pred = int(class_prob.argmax())
        evidence = []
        if with_evidence:
            explained = self._cam_class(logits, torch.tensor([pred if evidence_class is None else int(evidence_class)]))
            cams = self.classifier.cams(feats, explained)
            evidence = [
                minmax_per_sample(resize_to_scan(cams[unit].float(), shape))[0, 0].cpu().numpy()
                for unit in EVIDENCE_UNITS
            ]
        return {
            "lesion_prob": (blend_patches(probs, starts, shape, gaussian_importance(size)) if overlap
                            else stitch_patches(probs, starts, shape).astype(np.float32)),
            "class_prob": class_prob.cpu().numpy().astype(np.float32),
            "pred": pred,
            "evidence": evidence,
        }

    # ---------------------------------------------------------------- stage weights
    SEG_PREFIXES = ("seg_stem.", "lesion.")
    CLS_PREFIXES = ("cls_stem.", "classifier.")

    def load_stage_weights(
        self,
        seg_ckpt: Mapping[str, torch.Tensor] | str | os.PathLike,
        cls_ckpt: Mapping[str, torch.Tensor] | str | os.PathLike,
    ) -> None:
        """Start fine-tuning from the two stage-1 state dicts (or their ``.pt`` paths).

        The seg path (``seg_stem.*``, ``lesion.*``) comes from ``seg_ckpt``, the cls path
        (``cls_stem.*``, ``classifier.*``) from ``cls_ckpt``; the cross-stitch keeps its
        initialisation. Raises InputError naming the checkpoint when keys or shapes are missing.
        """
        state = self.state_dict()
        sources = ((seg_ckpt, self.SEG_PREFIXES, "segmentation"), (cls_ckpt, self.CLS_PREFIXES, "classification"))
        for ckpt, prefixes, label in sources:
            name = str(ckpt) if isinstance(ckpt, (str, os.PathLike)) else f"{label} checkpoint"
            loaded = _load_state(ckpt, name)
            for key in (k for k in state if k.startswith(prefixes)):
                if key not in loaded:
                    raise InputError(name, f"missing weight '{key}' of the {label} path")
                if tuple(loaded[key].shape) != tuple(state[key].shape):
                    got, need = tuple(loaded[key].shape), tuple(state[key].shape)
                    raise InputError(name, f"weight '{key}' has shape {got}, the model needs {need}")
                state[key] = loaded[key]
        self.load_state_dict(state)


def _load_state(ckpt: Mapping[str, torch.Tensor] | str | os.PathLike, name: str) -> Mapping[str, torch.Tensor]:
    if isinstance(ckpt, Mapping):
        return ckpt
    path = os.fspath(ckpt)
    if not os.path.isfile(path):
        raise InputError(name, "checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a state dict
        raise InputError(name, f"cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, Mapping):
        raise InputError(name, "the checkpoint is not a state dict")
    return state
