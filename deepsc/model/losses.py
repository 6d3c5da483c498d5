"""DeepSC-COVID losses (paper eq. 6-11): segmentation, weighted CE, task-aware, total.

The batch that :func:`total_loss` reads (one scan per sample, as for :meth:`DeepSC.forward`):

- ``label``: ``(B,)`` int64 class index (0 covid, 1 cap, 2 normal);
- ``lesion``: ``(B, 1, pd, ph, pw)`` {0, 1} lesion mask of the patch (all zeros for normal scans);
- ``has_mask``: ``(B,)`` bool, False where the scan's lesion mask is unknown (a covid/cap scan
  without annotation). Such samples add nothing to the segmentation and task-aware terms; they
  still count for classification.

Normalisations, stated once:

- **Dice** (eq. 6) is the soft Dice of S_hat = sigmoid(fused logit), with smoothing 1 (voxel)
  in numerator and denominator, pooled over the batch's samples with a known mask
  (:func:`batch_dice_loss`, nnU-Net's batch Dice; the paper's is per sample). An empty target
  (normal scans, lesion-free patches) then adds its false positives to the denominator instead
  of a per-sample ``sum(S_hat) / (sum(S_hat) + 1)`` that only says "predict nothing"; a batch
  with no lesion voxel at all scores ``sum(S_hat) / (sum(S_hat) + 1)``: 0 for an empty prediction.
- **Focal** (eq. 7) is MONAI's sigmoid focal loss (alpha weights the lesion class), mean over voxels.
- **Weighted CE** (eq. 9): ``xi_y * CE`` averaged over the batch, ``xi`` from
  :func:`class_weights_from_counts` (1 for every class of a balanced training set).
- **Task-aware** (eq. 10): ``sum_i eta_i * mean_voxels((sigmoid(S_i) - V_i)^2)``. sigmoid maps the
  side logits to probabilities; V_i arrive in [0, 1] already (the network min-max normalises
  each CAM per sample over the whole scan before cropping). The mean over voxels (not the sum of
  eq. 10) keeps the term independent of the patch size, so one lambda_ta fits both profiles.
  ``ta_scales: single`` keeps only the finest pair (S_3, V_3), weighted by ``sum(eta)`` so the
  term's overall weight is unchanged. The term covers covid and cap samples with a mask: the
  CAM of the normal class shows what makes a scan normal, not lesions, and pulling S_i towards
  it would fight the empty lesion mask of a normal scan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from deepsc import CLASSES
from deepsc.errors import ConfigError, InputError

TA_SCALES = ("multi", "single")
NORMAL_CLASS = CLASSES.index("normal")
_LOSS_KEYS = {
    "lambda_dice",
    "lambda_focal",
    "focal_gamma",
    "focal_alpha",
    "lambda_seg",
    "lambda_cls",
    "lambda_ta",
    "ta_scales",
    "ta_eta",
    "lambda_deep",
}


@dataclass(frozen=True)
class LossConfig:
    """Loss weights (params.yaml ``loss``) and the training set's class weights."""

    lambda_dice: float = 1.0
    lambda_focal: float = 1.0
    focal_gamma: float = 2.0
    focal_alpha: float = 0.75
    lambda_seg: float = 1.0
    lambda_cls: float = 1.0
    lambda_ta: float = 10.0
    ta_scales: str = "multi"
    ta_eta: tuple[float, float, float] = (0.25, 0.25, 0.5)
    lambda_deep: float = 0.0
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("lambda_dice", "lambda_focal", "focal_gamma", "lambda_seg", "lambda_cls", "lambda_ta", "lambda_deep"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"loss setting {name} must be a non-negative number, got {value!r}")
        if not 0.0 <= float(self.focal_alpha) <= 1.0:
            raise ConfigError(f"loss setting focal_alpha must lie in [0, 1], got {self.focal_alpha!r}")
        if self.ta_scales not in TA_SCALES:
            raise ConfigError(f"loss setting ta_scales must be one of {TA_SCALES}, got {self.ta_scales!r}")
        eta = tuple(float(e) for e in self.ta_eta)
        if len(eta) != 3 or any(e < 0 for e in eta):
            raise ConfigError(f"loss setting ta_eta must be three non-negative numbers, got {self.ta_eta!r}")
        object.__setattr__(self, "ta_eta", eta)
        if self.class_weights is not None:
            weights = tuple(float(w) for w in self.class_weights)
            if any(not w > 0 for w in weights):
                raise ConfigError(f"class weights must be positive, got {self.class_weights!r}")
            object.__setattr__(self, "class_weights", weights)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], class_counts: Sequence[int] | None = None) -> "LossConfig":
        """From the merged params' ``loss`` section; ``class_counts`` (training scans per class,
        in class order) sets the eq. 9 weights, None leaves CE unweighted."""
        section = params.get("loss")
        if not isinstance(section, Mapping):
            raise ConfigError("params.yaml has no 'loss' section")
        unknown = set(section) - _LOSS_KEYS
        if unknown:
            raise ConfigError(f"unknown loss setting(s): {', '.join(sorted(unknown))}")
        weights = None if class_counts is None else class_weights_from_counts(class_counts)
        return cls(**dict(section), class_weights=weights)

    def ta_weights(self) -> tuple[float, float, float]:
        """Weights of the (S_1, V_1), (S_2, V_2), (S_3, V_3) pairs for the chosen ``ta_scales``."""
        if self.ta_scales == "multi":
            return self.ta_eta  # type: ignore[return-value]
        return (0.0, 0.0, float(sum(self.ta_eta)))


def class_weights_from_counts(counts: Sequence[int]) -> tuple[float, ...]:
    """Inverse class frequency (eq. 9): ``xi_c = n_total / (C * n_c)``.

    A balanced set gets all ones; a class with half the average count gets 2.

    >>> class_weights_from_counts([10, 20, 40])
    (2.3333333333333335, 1.1666666666666667, 0.5833333333333334)
    """
    values = [int(c) for c in counts]
    if len(values) < 2:
        raise InputError("training set", f"need counts for at least two classes, got {list(counts)}")
    if any(c <= 0 for c in values):
        raise InputError("training set", f"every class needs at least one training scan, got counts {values}")
    total = sum(values)
    return tuple(total / (len(values) * c) for c in values)


def _as_mask(batch: Mapping[str, Any], batch_size: int, device: torch.device) -> torch.Tensor:
    has_mask = batch.get("has_mask")
    if has_mask is None:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    has_mask = torch.as_tensor(has_mask, device=device).bool().view(-1)
    if has_mask.shape[0] != batch_size:
        raise ValueError(f"has_mask has {has_mask.shape[0]} entries for a batch of {batch_size}")
    return has_mask


def _masked_mean(per_sample: torch.Tensor, mask: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean over samples where mask is True; 0 (still attached to the graph) if none is."""
    if bool(mask.any()):
        return per_sample[mask].mean()
    return anchor.sum() * 0.0


def segmentation_loss(seg_logit: torch.Tensor, lesion: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Eq. 6-8 per sample: ``{"dice": (B,), "focal": (B,), "seg": (B,)}``.

    Args:
        seg_logit: ``(B, 1, pd, ph, pw)`` fused logit (S_hat = sigmoid of it).
        lesion: same shape, {0, 1}.
    """
    from monai.losses import DiceLoss, FocalLoss

    if lesion.shape != seg_logit.shape:
        raise ValueError(f"lesion mask {tuple(lesion.shape)} does not match the seg output {tuple(seg_logit.shape)}")
    target = lesion.to(seg_logit.dtype)
    dice = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, reduction="none")(seg_logit, target).flatten(1).mean(1)
    focal_fn = FocalLoss(use_softmax=False, gamma=cfg.focal_gamma, alpha=cfg.focal_alpha, reduction="none")
    focal = focal_fn(seg_logit, target).flatten(1).mean(1)
    return {"dice": dice, "focal": focal, "seg": cfg.lambda_dice * dice + cfg.lambda_focal * focal}


def batch_dice_loss(seg_logit: torch.Tensor, lesion: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss over the masked samples of the batch taken together (nnU-Net's batch Dice).

    Per-sample Dice on a patch without lesion (normal scans, half the training patches) is
    ``1 - 1 / (sum S + 1)``: it only says "predict nothing" and drowns the lesion patches.
    Pooled over the batch, an empty patch adds its false positives to the denominator instead.
    No masked sample -> 0 (kept in the graph).

    Args:
        seg_logit: ``(B, 1, pd, ph, pw)`` fused logit.
        lesion: same shape, {0, 1}.
        mask: ``(B,)`` bool, samples whose lesion mask is known.
    """
    if not bool(mask.any()):
        return seg_logit.sum() * 0.0
    prob = torch.sigmoid(seg_logit[mask].float())
    target = lesion[mask].to(prob.dtype)
    overlap = (prob * target).sum()
    return 1.0 - (2.0 * overlap + 1.0) / (prob.sum() + target.sum() + 1.0)


def deep_supervision_loss(seg_side: Sequence[torch.Tensor], lesion: torch.Tensor, mask: torch.Tensor,
                          cfg: LossConfig) -> torch.Tensor:
    """Dice + focal of the coarse side outputs S_1..S_3 against the lesion mask average-pooled
    to their grids (nnU-Net's deep supervision), weighted 1/4, 1/4, 1/2 like eq. 3's eta.

    Not in the paper (its L_seg is on S_hat alone): the side outputs otherwise learn only through
    the fusion, and supervising them directly makes the U-Net converge in fewer steps.

    Args:
        seg_side: [S_1, S_2, S_3, ...] logits ``(B, 1, p / 8)``, ``(B, 1, p / 4)``, ``(B, 1, p / 2)``.
        lesion: ``(B, 1, pd, ph, pw)`` {0, 1} at patch resolution.
        mask: ``(B,)`` bool, samples whose lesion mask is known.
    """
    total = seg_side[0].float().sum() * 0.0
    for weight, side in zip((0.25, 0.25, 0.5), seg_side[:3]):
        factor = [full // part for full, part in zip(lesion.shape[2:], side.shape[2:])]
        target = F.avg_pool3d(lesion.float(), kernel_size=factor, stride=factor)
        focal = segmentation_loss(side, target.to(side.dtype), cfg)["focal"]
        term = cfg.lambda_dice * batch_dice_loss(side, target, mask) + cfg.lambda_focal * _masked_mean(focal, mask, side)
        total = total + weight * term
    return total


def classification_loss(cls_logit: torch.Tensor, label: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Eq. 9: class-weighted cross-entropy, mean over the batch of ``xi_y * CE``."""
    label = torch.as_tensor(label, device=cls_logit.device).long().view(-1)
    if label.shape[0] != cls_logit.shape[0]:
        raise ValueError(f"{label.shape[0]} labels for a batch of {cls_logit.shape[0]}")
    ce = F.cross_entropy(cls_logit.float(), label, reduction="none")
    if cfg.class_weights is None:
        return ce.mean()
    if len(cfg.class_weights) != cls_logit.shape[1]:
        raise ValueError(f"{len(cfg.class_weights)} class weights for {cls_logit.shape[1]} classes")
    weights = torch.tensor(cfg.class_weights, dtype=ce.dtype, device=ce.device)
    return (weights[label] * ce).mean()


def task_aware_loss(
    seg_side: Sequence[torch.Tensor], evidence: Sequence[torch.Tensor], cfg: LossConfig
) -> torch.Tensor:
    """Eq. 10 per sample ``(B,)``: ``sum_i w_i * mean((sigmoid(S_i) - V_i)^2)`` over i = 1..3.

    ``seg_side[i]`` and ``evidence[i]`` share the grid of S_{i+1}; the weights come from
    :meth:`LossConfig.ta_weights` (multi- or single-scale).
    """
    if len(seg_side) < 3 or len(evidence) != 3:
        raise ValueError(f"task-aware loss needs S_1..S_3 and V_1..V_3, got {len(seg_side)} and {len(evidence)}")
    total = None
    for weight, side, ev in zip(cfg.ta_weights(), seg_side[:3], evidence):
        if side.shape != ev.shape:
            raise ValueError(f"S_i {tuple(side.shape)} and V_i {tuple(ev.shape)} must share a grid")
        if weight == 0:
            continue
        term = weight * (torch.sigmoid(side.float()) - ev.float()).pow(2).flatten(1).mean(1)
        total = term if total is None else total + term
    if total is None:
        return seg_side[0].float().flatten(1).sum(1) * 0.0
    return total


def total_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Eq. 11: ``lambda_seg L_seg + lambda_cls L_cls + lambda_ta L_ta`` for one backward pass.

    Terms follow what ``outputs`` (from :meth:`DeepSC.forward`) holds: task ``seg`` gives the
    segmentation terms, ``cls`` the classification term, ``joint`` all three. The TA term joins
    the total only when ``lambda_ta > 0`` (so ``lambda_ta = 0`` yields exactly the gradients of
    the loss without it); its value is reported either way.

    Returns:
        dict of scalar tensors: ``total`` (differentiable) and whichever of ``seg``, ``dice``,
        ``focal``, ``cls``, ``ta`` apply (each already averaged over the samples it covers).
    """
    result: dict[str, torch.Tensor] = {}
    terms: list[torch.Tensor] = []
    seg_logit = outputs.get("seg_logit")
    cls_logit = outputs.get("cls_logit")
    if seg_logit is None and cls_logit is None:
        raise ValueError("outputs hold neither seg_logit nor cls_logit")

    if seg_logit is not None:
        if "lesion" not in batch:
            raise ValueError("the batch needs 'lesion' for the segmentation loss")
        mask = _as_mask(batch, seg_logit.shape[0], seg_logit.device)
        lesion = torch.as_tensor(batch["lesion"], device=seg_logit.device)
        seg = segmentation_loss(seg_logit, lesion, cfg)
        result["focal"] = _masked_mean(seg["focal"], mask, seg_logit)
        result["dice"] = batch_dice_loss(seg_logit, lesion, mask)
        result["seg"] = cfg.lambda_dice * result["dice"] + cfg.lambda_focal * result["focal"]
        terms.append(cfg.lambda_seg * result["seg"])
        if cfg.lambda_deep > 0 and len(outputs.get("seg_side") or []) >= 3:
            result["deep"] = deep_supervision_loss(outputs["seg_side"], lesion, mask, cfg)
            terms.append(cfg.lambda_seg * cfg.lambda_deep * result["deep"])

    if cls_logit is not None:
        if "label" not in batch:
            raise ValueError("the batch needs 'label' for the classification loss")
        result["cls"] = classification_loss(cls_logit, batch["label"], cfg)
        terms.append(cfg.lambda_cls * result["cls"])

    if seg_logit is not None and cls_logit is not None and outputs.get("evidence"):
        per_sample = task_aware_loss(outputs["seg_side"], outputs["evidence"], cfg)
        label = torch.as_tensor(batch["label"], device=seg_logit.device).view(-1)
        result["ta"] = _masked_mean(per_sample, mask & (label != NORMAL_CLASS), seg_logit)
        if cfg.lambda_ta > 0:
            terms.append(cfg.lambda_ta * result["ta"])

    result["total"] = torch.stack([t.float() for t in terms]).sum()
    return result
