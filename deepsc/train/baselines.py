"""MONAI baselines of Table II, trained with the SAME engine, data and tracking as DeepSC.

* ``unet`` - MONAI 3D UNet (``deepsc.model.baselines.build_seg_baseline``) on the same
  lesion-biased patches ``(B, 1, pd, ph, pw)``, with DeepSC's segmentation loss (Dice + focal,
  scans without a mask skipped).
* ``classifier`` - MONAI 3D DenseNet121 or ResNet-18 (``baselines.classifier``) on the same
  classification input ``(B, 1, N, Hc, Wc)``, with the same inverse-frequency weighted CE.

Only the adapter differs from a DeepSC stage (which input goes in, which output comes out);
the loop, checkpoints/resume, DDP, AMP and MLflow run are those of :mod:`deepsc.train.engine`
and :func:`deepsc.train.stages.run_tracked`. Settings: ``baselines.{epochs, lr, batch_size}``
(epochs null: the budget of the DeepSC path it stands in for, :func:`baseline_epochs`),
seed / amp / workers from ``train``. The folder is rebuilt by
:func:`deepsc.train.stages.load_model` (``config.json`` ``kind`` = unet | classifier).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

from deepsc import CLASSES
from deepsc.errors import ConfigError

KINDS = ("unet", "classifier")


def build_baseline(kind: str, params: Mapping[str, Any]) -> "torch.nn.Module":
    """The untrained MONAI network of ``kind`` (unet | classifier) for these settings."""
    from deepsc.model.baselines import build_cls_baseline, build_seg_baseline

    if kind not in KINDS:
        raise ConfigError(f"baseline must be one of {', '.join(KINDS)}, got {kind!r}")
    return build_seg_baseline(params) if kind == "unet" else build_cls_baseline(params)


class BaselineAdapter:
    """One input tensor in, one DeepSC-named output out; losses from ``deepsc.model.losses``.

    Args:
        kind: ``unet`` (patch -> ``seg_logit`` ``(B, 1, pd, ph, pw)``) or ``classifier``
            (cls -> ``cls_logit`` ``(B, 3)``).
        loss_config: ``LossConfig`` with the training set's class weights.
    """

    find_unused_parameters = False

    def __init__(self, kind: str, loss_config: Any):
        if kind not in KINDS:
            raise ConfigError(f"baseline must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self.input_key, self.output_key = ("patch", "seg_logit") if kind == "unet" else ("cls", "cls_logit")
        self.loss_config = loss_config

    def trainable_parameters(self, model):
        return list(model.parameters())

    def forward(self, model, batch):
        return {self.output_key: model(batch[self.input_key])}

    def loss(self, outputs, batch):
        from deepsc.model.losses import total_loss

        return total_loss(outputs, batch, self.loss_config)

    def batch_metrics(self, outputs, batch):
        from deepsc.train.stages import batch_dice

        if self.kind == "unet":
            return batch_dice(outputs["seg_logit"], batch["lesion"], batch["has_mask"])
        return {"accuracy": float((outputs["cls_logit"].argmax(1) == batch["label"]).float().mean())}


# What a baseline's weights depend on besides the engine settings (epochs, lr, batch, seed, amp),
# the data and the code: a persisted folder trained with other values is not resumed
# (dvc re-runs the stage after `baselines.unet_channels` changes; resuming the old checkpoint
# into the new architecture would fail on the shapes).
BASELINE_SETTINGS = {
    "unet": ("baselines.unet_channels", "loss.lambda_dice", "loss.lambda_focal", "loss.focal_gamma", "loss.focal_alpha",
             "train.lesion_patch_prob", "train.pretrain_seg.patch_sampling", "train.flip_prob"),
    "classifier": ("baselines.classifier", "baselines.classifier_width", "train.lesion_patch_prob", "train.flip_prob"),
}


def baseline_settings_key(kind: str, params: Mapping[str, Any]) -> str:
    """SHA-256 of the settings in :data:`BASELINE_SETTINGS` for ``kind``."""
    from deepsc.train.stages import hash_settings

    if kind not in KINDS:
        raise ConfigError(f"baseline must be one of {', '.join(KINDS)}, got {kind!r}")
    return hash_settings(BASELINE_SETTINGS[kind], params)


# the DeepSC stages whose epochs a baseline gets when ``baselines.epochs`` is null
MATCHED_STAGES = {"unet": ("pretrain_seg", "finetune"), "classifier": ("pretrain_cls", "finetune")}


def baseline_epochs(kind: str, params: Mapping[str, Any]) -> int:
    """``baselines.epochs``, or when it is null the epochs of the DeepSC path the baseline
    stands in for: stage 1 plus joint fine-tuning (UNet: 30 + 20 = 50 in the default profile).

    Matching the budget is what makes Table II a comparison of architectures: at 12 epochs
    the UNet reached 22.6 DSC on the held-out scans, at its matched 50 epochs 52.8.
    """
    if kind not in KINDS:
        raise ConfigError(f"baseline must be one of {', '.join(KINDS)}, got {kind!r}")
    epochs = params.get("baselines", {}).get("epochs")
    if epochs is not None:
        return int(epochs)
    train = params.get("train", {})
    try:
        return sum(int(train[stage]["epochs"]) for stage in MATCHED_STAGES[kind])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"baselines.epochs is null (matched) but train lacks the epochs of {MATCHED_STAGES[kind]}") from exc


def engine_config(params: Mapping[str, Any], kind: str) -> "deepsc.train.engine.EngineConfig":
    """Epochs (:func:`baseline_epochs`), lr and batch size from ``baselines``; seed, amp and
    workers from ``train``."""
    from deepsc.train.engine import EngineConfig

    section, train = params.get("baselines"), params.get("train", {})
    if not isinstance(section, Mapping):
        raise ConfigError("params.yaml has no 'baselines' section")
    missing = [k for k in ("epochs", "lr", "batch_size") if k not in section]
    if missing:
        raise ConfigError(f"baselines lacks {', '.join(missing)}")
    return EngineConfig(epochs=baseline_epochs(kind, params), lr=float(section["lr"]), batch_size=int(section["batch_size"]),
                        seed=int(train.get("seed", 0)), amp=str(train.get("amp", "auto")),
                        num_workers=int(train.get("num_workers", 0)),
                        cpu_threads=None if train.get("cpu_threads") is None else int(train["cpu_threads"]))


def train_baseline(
    kind: str,
    preprocessed: Path,
    split: Path,
    out_dir: Path,
    params: Mapping[str, Any],
    *,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> Path:
    """Train the ``kind`` baseline on the ``train`` subset; returns ``out_dir`` (as DeepSC stages)."""
    from deepsc.model.losses import LossConfig
    from deepsc.train.dataset import ScanDataset, class_counts, patch_sampling_setting, read_cohort
    from deepsc.train.engine import seed_everything
    from deepsc.train.stages import check_patch_size, code_key, data_key, run_tracked

    if kind not in KINDS:
        raise ConfigError(f"baseline must be one of {', '.join(KINDS)}, got {kind!r}")
    engine = engine_config(params, kind)
    records = read_cohort(Path(preprocessed), Path(split), "train")
    check_patch_size(records[0].patch_size, params)
    train = params.get("train", {})
    dataset = ScanDataset(records, "train", float(train.get("lesion_patch_prob", 0.8)), engine.seed,
                          flip_prob=float(train.get("flip_prob", 0.0)),
                          patch_sampling=patch_sampling_setting(params, "pretrain_seg"))  # as the seg pre-training
    counts = class_counts(records)
    seed_everything(engine.seed)
    model = build_baseline(kind, params)
    adapter = BaselineAdapter(kind, LossConfig.from_params(params, class_counts=counts))
    architecture = "unet" if kind == "unet" else str(params["baselines"]["classifier"])
    stage = f"baseline-{kind}"
    config = {
        "kind": kind,
        "architecture": architecture,
        "stage": stage,
        "task": "seg" if kind == "unet" else "cls",
        "classes": list(CLASSES),
        "params": {k: params[k] for k in ("baselines", "preprocess", "loss", "train") if k in params},
        "settings_key": baseline_settings_key(kind, params),
        "data_key": data_key(Path(preprocessed), Path(split)),
        "code_key": code_key(stage),
        "class_counts": counts,
        "engine": {"epochs": engine.epochs, "lr": engine.lr, "batch_size": engine.batch_size, "seed": engine.seed},
    }
    return run_tracked(model, dataset, adapter, engine, Path(out_dir), params, config,
                       run_name=f"baseline-{architecture}", parent_run_id=parent_run_id, progress=progress)


# --------------------------------------------------------------------------- CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--which", required=True, choices=(*KINDS, "all"),
                        help="unet (segmentation), classifier (baselines.classifier) or all (each into OUT/<kind>)")
    parser.add_argument("--preprocessed", type=Path, default=Path("outputs/preprocessed"))
    parser.add_argument("--split", type=Path, default=Path("outputs/split.csv"))
    parser.add_argument("--out", type=Path, required=True, help="output folder (resumed when it holds last.pt)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def run_cli(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    if args.which == "all":
        for kind in KINDS:
            print(train_baseline(kind, args.preprocessed, args.split, Path(args.out) / kind, params, progress=not args.no_progress))
    else:
        print(train_baseline(args.which, args.preprocessed, args.split, args.out, params, progress=not args.no_progress))
    return 0
