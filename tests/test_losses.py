"""deepsc.model.losses: eq. 6-11 against hand-computed values, masks, ablation switches."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from deepsc.errors import ConfigError, InputError  # noqa: E402
from deepsc.model.losses import (  # noqa: E402
    LossConfig,
    class_weights_from_counts,
    classification_loss,
    segmentation_loss,
    task_aware_loss,
    total_loss,
)

SHAPE = (1, 1, 2, 4, 4)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_class_weights_are_inverse_frequency():
    assert class_weights_from_counts([10, 10, 10]) == (1.0, 1.0, 1.0)
    assert class_weights_from_counts([10, 20, 40]) == pytest.approx((70 / 30, 70 / 60, 70 / 120))
    with pytest.raises(InputError, match="at least one"):
        class_weights_from_counts([5, 0, 3])


def test_loss_config_from_params_and_validation(params):
    cfg = LossConfig.from_params(params, class_counts=[1, 2, 1])
    assert cfg.lambda_ta == params["loss"]["lambda_ta"] and cfg.class_weights == pytest.approx((4 / 3, 2 / 3, 4 / 3))
    assert LossConfig.from_params(params).class_weights is None
    with pytest.raises(ConfigError, match="ta_scales"):
        LossConfig(ta_scales="both")
    with pytest.raises(ConfigError, match="lambda_ta"):
        LossConfig(lambda_ta=-1.0)
    with pytest.raises(ConfigError, match="focal_alpha"):
        LossConfig(focal_alpha=1.5)
    params["loss"]["lambda_tversky"] = 1.0
    with pytest.raises(ConfigError, match="lambda_tversky"):
        LossConfig.from_params(params)


def test_dice_and_focal_match_eq_6_and_7():
    p = 0.8
    seg_logit = torch.full(SHAPE, logit(p))
    lesion = torch.zeros(SHAPE)
    lesion[..., :2] = 1.0  # 16 of 32 voxels
    cfg = LossConfig(focal_gamma=2.0, focal_alpha=0.75)
    out = segmentation_loss(seg_logit, lesion, cfg)
    inter, pred_sum, true_sum = 16 * p, 32 * p, 16
    assert float(out["dice"]) == pytest.approx(1 - (2 * inter + 1) / (pred_sum + true_sum + 1), rel=1e-5)
    focal_pos = -0.75 * (1 - p) ** 2 * math.log(p)
    focal_neg = -0.25 * p**2 * math.log(1 - p)
    assert float(out["focal"]) == pytest.approx((focal_pos + focal_neg) / 2, rel=1e-5)
    assert float(out["seg"]) == pytest.approx(float(out["dice"]) + float(out["focal"]), rel=1e-6)


def test_dice_on_an_empty_mask_is_defined():
    empty = torch.zeros(SHAPE)
    quiet = segmentation_loss(torch.full(SHAPE, -20.0), empty, LossConfig())["dice"]
    loud = segmentation_loss(torch.full(SHAPE, 20.0), empty, LossConfig())["dice"]
    assert float(quiet) < 1e-6  # nothing predicted, nothing there: no loss
    assert float(loud) == pytest.approx(32 / 33, rel=1e-5)  # sum(S_hat) / (sum(S_hat) + 1)


def test_weighted_cross_entropy_matches_eq_9():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    label = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, label, reduction="none")
    cfg = LossConfig(class_weights=(2.0, 0.5, 1.0))
    assert float(classification_loss(logits, label, cfg)) == pytest.approx(float((2.0 * ce[0] + 0.5 * ce[1]) / 2))
    assert float(classification_loss(logits, label, LossConfig())) == pytest.approx(float(ce.mean()))


def test_task_aware_loss_multi_and_single_scale():
    sides = [torch.full((1, 1, 1, 2, 2), logit(0.5)), torch.full((1, 1, 2, 4, 4), logit(0.25))]
    sides.append(torch.zeros(1, 1, 4, 8, 8))
    evidence = [torch.ones(1, 1, 1, 2, 2), torch.zeros(1, 1, 2, 4, 4), torch.full((1, 1, 4, 8, 8), 0.5)]
    multi = task_aware_loss(sides, evidence, LossConfig(ta_eta=(0.25, 0.25, 0.5)))
    assert float(multi) == pytest.approx(0.25 * 0.25 + 0.25 * 0.0625 + 0.5 * 0.0)
    evidence[2] = torch.ones(1, 1, 4, 8, 8)
    single = task_aware_loss(sides, evidence, LossConfig(ta_scales="single", ta_eta=(0.25, 0.25, 0.5)))
    assert float(single) == pytest.approx(1.0 * 0.25)  # only (S_3, V_3), weight sum(eta)
    with pytest.raises(ValueError, match="share a grid"):
        task_aware_loss(sides, evidence[::-1], LossConfig())


def fake_outputs(batch_size: int = 2, requires_grad: bool = True) -> dict:
    torch.manual_seed(0)
    grids = ((1, 2, 2), (2, 4, 4), (4, 8, 8), (8, 16, 16))
    sides = [torch.randn(batch_size, 1, *s, requires_grad=requires_grad) for s in grids]
    return {
        "seg_logit": torch.randn(batch_size, 1, 8, 16, 16, requires_grad=requires_grad),
        "seg_side": sides,
        "cls_logit": torch.randn(batch_size, 3, requires_grad=requires_grad),
        "evidence": [torch.rand(batch_size, 1, *s.shape[2:]) for s in sides[:3]],
    }


def fake_batch(batch_size: int = 2) -> dict:
    lesion = torch.zeros(batch_size, 1, 8, 16, 16)
    lesion[0, :, 2:5, 4:9, 4:9] = 1.0
    has_mask = torch.ones(batch_size, dtype=torch.bool)
    return {"label": torch.arange(batch_size) % 3, "lesion": lesion, "has_mask": has_mask}


def test_total_loss_is_the_weighted_sum_of_its_terms():
    outputs, batch = fake_outputs(), fake_batch()
    cfg = LossConfig(lambda_seg=2.0, lambda_cls=0.5, lambda_ta=10.0)
    parts = total_loss(outputs, batch, cfg)
    assert set(parts) == {"seg", "dice", "focal", "cls", "ta", "total"}
    expected = 2.0 * parts["seg"] + 0.5 * parts["cls"] + 10.0 * parts["ta"]
    assert parts["total"].item() == pytest.approx(expected.item())
    parts["total"].backward()
    assert all(s.grad is not None for s in outputs["seg_side"][:3])  # the TA term reaches S_1..S_3


def test_samples_without_a_mask_skip_the_seg_and_ta_terms():
    outputs, batch = fake_outputs(), fake_batch()
    batch["has_mask"] = torch.tensor([True, False])
    parts = total_loss(outputs, batch, LossConfig())
    first = {k: (v[:1] if torch.is_tensor(v) else [t[:1] for t in v]) for k, v in outputs.items()}
    alone = total_loss(first, {k: v[:1] for k, v in batch.items()}, LossConfig())
    for key in ("seg", "dice", "focal", "ta"):
        assert parts[key].item() == pytest.approx(alone[key].item(), rel=1e-6)
    batch["has_mask"] = torch.tensor([False, False])
    parts = total_loss(outputs, batch, LossConfig())
    assert parts["seg"].item() == 0.0 and parts["ta"].item() == 0.0
    parts["total"].backward()  # still one valid graph: the cls term trains
    assert outputs["cls_logit"].grad is not None and float(outputs["seg_logit"].grad.abs().sum()) == 0.0


def test_task_aware_term_skips_normal_scans():
    outputs, batch = fake_outputs(), fake_batch()
    batch["label"] = torch.tensor([0, 2])  # covid, normal
    parts = total_loss(outputs, batch, LossConfig())
    first = {k: (v[:1] if torch.is_tensor(v) else [t[:1] for t in v]) for k, v in outputs.items()}
    alone = total_loss(first, {k: v[:1] for k, v in batch.items()}, LossConfig())
    assert parts["ta"].item() == pytest.approx(alone["ta"].item(), rel=1e-6)
    assert parts["seg"].item() != pytest.approx(alone["seg"].item())  # normal scans still train seg


def test_total_loss_follows_the_task_of_the_outputs():
    outputs, batch = fake_outputs(), fake_batch()
    seg_only = dict(outputs, cls_logit=None, evidence=[])
    assert set(total_loss(seg_only, batch, LossConfig())) == {"seg", "dice", "focal", "total"}
    cls_only = dict(outputs, seg_logit=None, seg_side=[])
    assert set(total_loss(cls_only, batch, LossConfig())) == {"cls", "total"}
    with pytest.raises(ValueError, match="lesion"):
        total_loss(outputs, {"label": batch["label"]}, LossConfig())


def test_deep_supervision_scores_the_side_outputs_against_the_pooled_mask():
    from deepsc.model.losses import batch_dice_loss, deep_supervision_loss

    outputs, batch = fake_outputs(), fake_batch()
    mask = batch["has_mask"]
    off = total_loss(outputs, batch, LossConfig(lambda_ta=0.0))
    on = total_loss(outputs, batch, LossConfig(lambda_ta=0.0, lambda_deep=0.5, lambda_seg=2.0))
    assert "deep" not in off  # lambda_deep = 0 (the default) leaves eq. 11 exactly as it was
    assert on["total"].item() == pytest.approx((2.0 * (on["seg"] + 0.5 * on["deep"]) + on["cls"]).item())

    # a lesion aligned with the 8x8x8 blocks of S_1: side outputs that equal the pooled mask score ~0
    aligned = torch.zeros(2, 1, 8, 16, 16)
    aligned[0, :, :8, :8, :8] = 1.0
    perfect = [torch.logit(torch.nn.functional.avg_pool3d(aligned, f).clamp(1e-4, 1 - 1e-4)) for f in (8, 4, 2)]
    assert deep_supervision_loss(perfect, aligned, mask, LossConfig()).item() < 0.01
    assert batch_dice_loss(perfect[2], torch.nn.functional.avg_pool3d(aligned, 2), mask).item() < 0.01
    assert deep_supervision_loss(outputs["seg_side"], batch["lesion"], mask, LossConfig()).item() > 0.1

    outputs = fake_outputs()
    total_loss(outputs, batch, LossConfig(lambda_ta=0.0, lambda_cls=0.0, lambda_deep=1.0))["total"].backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in outputs["seg_side"][:3])
    assert outputs["seg_side"][3].grad is None  # S_4 learns through S_hat only
    with pytest.raises(ConfigError, match="lambda_deep"):
        LossConfig(lambda_deep=-1.0)
