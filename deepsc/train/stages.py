"""The two-stage training of DeepSC (paper Sec. V-A), one MLflow run per stage.

Stages (``deepsc train --stage ...``):

* ``pretrain-seg`` - the segmentation path (its inception block + lesion subnet), task
  ``seg``, segmentation loss only (Dice + focal), lr ``train.pretrain_seg.lr`` (1e-3).
* ``pretrain-cls`` - the classification path (its inception block + classification subnet),
  task ``cls``, inverse-frequency weighted cross-entropy only. Its lesion-map input is the
  reference mask (``train.pretrain_cls.lesion_context: reference``) or the finished
  ``pretrain-seg`` model's segmentation of each training scan (``predicted``, as at inference;
  needs that folder as ``init_from["seg"]``).
* ``finetune`` - all three subnets together, started from BOTH stage-1 checkpoints
  (``DeepSC.load_stage_weights``; the cross-stitch units start at ``model.cross_stitch_init``),
  task ``joint``, the total loss of eq. 11 (``loss.lambda_*``), lr ``train.finetune.lr`` (1e-4).
  ``train.task: seg | cls`` fine-tunes a single-task model instead (the ablation's
  single-task baselines): only that path trains, with only its loss.

Each stage writes ``model.pt`` (state dict), ``config.json`` (everything needed to rebuild the
model, see :func:`load_model`), ``history.csv``, ``last.pt`` and ``run.json`` (MLflow run id)
into its folder and logs them as MLflow artifacts. Re-running on a folder with ``last.pt``
resumes the interrupted training.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from deepsc import CLASSES
from deepsc.errors import ConfigError, InputError

log = logging.getLogger(__name__)

STAGES = ("pretrain-seg", "pretrain-cls", "finetune")
TASKS = ("joint", "seg", "cls")
STAGE_SECTION = {"pretrain-seg": "pretrain_seg", "pretrain-cls": "pretrain_cls", "finetune": "finetune"}
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"

# Settings each stage's weights depend on (dotted prefixes); the ablation grid re-uses a
# stage-1 checkpoint only when these agree. Cross-stitch settings do not touch stage 1.
_MODEL_BUT_CROSS_STITCH = ("model.inception", "model.seg_widths", "model.cls_widths", "model.seg_eta", "model.norm_groups")
STAGE_SETTINGS = {
    "pretrain-seg": (*_MODEL_BUT_CROSS_STITCH, "preprocess", "loss.lambda_dice", "loss.lambda_focal", "loss.focal_gamma", "loss.lambda_deep",
                     "loss.focal_alpha", "train.seed", "train.lesion_patch_prob", "train.flip_prob", "train.pretrain_seg"),
    "pretrain-cls": (*_MODEL_BUT_CROSS_STITCH, "preprocess", "train.seed", "train.lesion_patch_prob", "train.flip_prob", "train.pretrain_cls"),
    "finetune": ("model", "preprocess", "loss", "train.seed", "train.lesion_patch_prob", "train.flip_prob", "train.task", "train.amp",
                 "train.lesion_context", "train.finetune"),
}


@dataclass(frozen=True)
class StagePlan:
    """What one stage trains: the forward ``task`` of DeepSC and the trained parameters.

    The loss follows the task: ``total_loss`` computes the terms of the paths that ran (seg:
    Dice + focal; cls: weighted CE; joint: eq. 11 with the task-aware term).
    ``image_only``: the classifier is trained for the single-task ``w/o Seg`` model
    (``train.task: cls``) and never gets a lesion map, in either stage.
    """

    stage: str
    task: str  # joint | seg | cls
    trains: str  # seg | cls | all
    image_only: bool = False

    @property
    def teacher_forcing(self) -> bool:
        """Whether the classifier's lesion map is completed outside the patch in training (from
        the stage-1 segmentation of the whole scan, or the reference mask: ``train.lesion_context``;
        stage-1 cls pre-training uses the mask, as no segmentation exists yet).

        Yes for models that segment at inference (joint) and for the stage-1 cls pre-training of
        a model that will (its classifier is fine-tuned jointly later); no for the single-task
        classifier (``w/o Seg``), which never gets a lesion map at inference: pre-trained on
        reference masks, it would learn to rely on a channel that is empty at test time.
        """
        return not self.image_only and (self.task == "joint" or self.stage == "pretrain-cls")

    @property
    def name(self) -> str:
        return self.stage if self.task == "joint" or self.stage != "finetune" else f"finetune-{self.task}"


def stage_plan(stage: str, params: Mapping[str, Any]) -> StagePlan:
    """The plan of ``stage`` under ``params`` (``train.task`` picks single-task fine-tuning;
    ``cls`` also makes the stage-1 classifier image-only)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    task = str(params.get("train", {}).get("task", "joint"))
    if task not in TASKS:
        raise ConfigError(f"train.task must be one of {', '.join(TASKS)}, got {task!r}")
    if stage == "pretrain-seg":
        return StagePlan(stage, "seg", "seg")
    if stage == "pretrain-cls":
        return StagePlan(stage, "cls", "cls", image_only=task == "cls")
    return StagePlan(stage, task, "all" if task == "joint" else task, image_only=task == "cls")


def settings_key(stage: str, params: Mapping[str, Any]) -> str:
    """SHA-256 of the settings ``stage``'s weights depend on (see ``STAGE_SETTINGS``)."""
    if stage not in STAGE_SETTINGS:
        raise ConfigError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    extra = {}
    plan = stage_plan(stage, params)
    if stage == "finetune":
        extra["train.task"] = plan.task  # absent key = joint
    elif plan.image_only:  # only then, so the hash of every other pretrain-cls model is unchanged
        extra["image_only"] = True
    return hash_settings(STAGE_SETTINGS[stage], params, extra)


def hash_settings(keys: Sequence[str], params: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of the dotted ``keys`` of ``params`` (absent ones as null) and ``extra``."""
    chosen = {key: _dotted(params, key) for key in keys}
    chosen.update(extra or {})
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()


# The sources (paths under deepsc/) a trained model depends on besides its settings and data.
# dvc re-runs a training stage when they change, and its `persist: true` folder still holds the
# finished checkpoint of the old code: without this key the stage would "resume" it and train
# nothing. Each training stage of dvc.yaml lists its sources as deps (tests/test_train.py checks).
CODE_SOURCES = ("model", "train", "data/patches.py", "data/preprocess.py")
# fine-tuning (and pretrain-cls on predicted lesion maps) also segments the training scans
# with the stage-1 model (deepsc.inference)
FINETUNE_CODE_SOURCES = (*CODE_SOURCES, "inference.py")


def code_sources(stage: str) -> tuple[str, ...]:
    """The sources ``stage`` (a DeepSC stage or ``baseline-<kind>``) trains with."""
    return FINETUNE_CODE_SOURCES if stage in ("finetune", "pretrain-cls") else CODE_SOURCES


@functools.lru_cache(maxsize=None)
def code_key(stage: str) -> str:
    """SHA-256 of the package sources of :func:`code_sources` (paths and bytes)."""
    root = Path(__file__).resolve().parents[1]
    files = sorted(path for name in code_sources(stage)
                   for path in ((root / name).rglob("*.py") if (root / name).is_dir() else [root / name]))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def weights_sha256(folders: Mapping[str, Path]) -> dict[str, str]:
    """``{name: sha256 of folder/model.pt}`` ("missing" where there is none)."""
    found = {}
    for name, folder in sorted(folders.items()):
        weights = Path(folder) / "model.pt"
        found[name] = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else "missing"
    return found


def data_key(preprocessed: Path, split: Path) -> str:
    """SHA-256 of the preprocessed index and the split: which scans, which content."""
    digest = hashlib.sha256()
    for path in (Path(preprocessed) / "index.csv", Path(split)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- DeepSC adapter


class DeepSCAdapter:
    """Plugs DeepSC into :func:`deepsc.train.engine.fit` for one :class:`StagePlan`.

    Args:
        plan: the stage's task and trained parameters.
        loss_config: ``deepsc.model.losses.LossConfig`` (with the training set's class weights).
    """

    def __init__(self, plan: StagePlan, loss_config: Any):
        self.plan = plan
        self.loss_config = loss_config
        # every trainable parameter takes part in its task's forward pass (the other path is
        # frozen, and DDP ignores frozen parameters), so DDP needs no unused-parameter search
        self.find_unused_parameters = False

    def trainable_parameters(self, model):
        if self.plan.trains == "seg":
            return model.seg_parameters()
        if self.plan.trains == "cls":
            return model.cls_parameters()
        return list(model.parameters())

    def forward(self, model, batch):
        # training CAMs / evidence use the true class (MODEL_FACTS: "predicted (or true) class")
        target = None if self.plan.task == "seg" else batch["label"]
        return model(batch["cls"], batch["patch"], batch["box"], task=self.plan.task, target=target,
                     lesion_context=batch.get("lesion_cls") if self.plan.teacher_forcing else None,
                     context_known=batch.get("context_known", batch.get("has_mask")))

    def loss(self, outputs, batch):
        from deepsc.model.losses import total_loss

        return total_loss(outputs, batch, self.loss_config)

    def batch_metrics(self, outputs, batch):
        metrics: dict[str, float] = {}
        if outputs.get("seg_logit") is not None:
            metrics.update(batch_dice(outputs["seg_logit"], batch["lesion"], batch["has_mask"]))
        if outputs.get("cls_logit") is not None:
            metrics["accuracy"] = float((outputs["cls_logit"].argmax(1) == batch["label"]).float().mean())
        return metrics


def batch_dice(seg_logit: "torch.Tensor", mask: "torch.Tensor", has_mask: "torch.Tensor") -> dict[str, float]:
    """Dice of the thresholded patch prediction (logit > 0) over the scans with a known mask.

    Empty prediction and empty mask count as Dice 1 (a correctly empty patch). Returns ``{}``
    when no scan of the batch has a mask.
    """
    import torch

    known = has_mask.bool()
    if not bool(known.any()):
        return {}
    pred = (seg_logit[known] > 0).flatten(1).float()
    truth = (mask[known] > 0.5).flatten(1).float()
    inter = (pred * truth).sum(1)
    denom = pred.sum(1) + truth.sum(1)
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
    return {"dice": float(dice.mean())}


# --------------------------------------------------------------------------- the stage


@dataclass
class PreparedStage:
    """Everything :func:`deepsc.train.engine.fit` needs for one stage, plus its ``config.json``."""

    plan: StagePlan
    model: Any  # DeepSC
    dataset: Any  # ScanDataset
    adapter: DeepSCAdapter
    engine: Any  # EngineConfig
    config: dict[str, Any]


def prepare_stage(
    stage: str,
    preprocessed: Path,
    split: Path,
    params: Mapping[str, Any],
    init_from: Mapping[str, Path] | None = None,
) -> PreparedStage:
    """Model (seeded init, stage-1 weights for finetune), training set, adapter and settings."""
    from deepsc.model.losses import LossConfig
    from deepsc.model.network import DeepSC, ModelConfig
    from deepsc.train.dataset import ScanDataset, class_counts, patch_sampling_setting, predicted_lesion_context, read_cohort
    from deepsc.train.engine import EngineConfig, seed_everything

    plan = stage_plan(stage, params)
    reads_segmentation = reads_stage1_segmentation(stage, params)
    inits = _stage1_folders(stage, init_from, needs_seg=reads_segmentation)
    engine = EngineConfig.from_params(params, STAGE_SECTION[stage])
    records = read_cohort(Path(preprocessed), Path(split), "train")
    check_patch_size(records[0].patch_size, params)
    lesion_patch_prob = float(params.get("train", {}).get("lesion_patch_prob", 0.8))
    flip_prob = float(params.get("train", {}).get("flip_prob", 0.0))
    counts = class_counts(records)
    cohort_key = data_key(Path(preprocessed), Path(split))
    model_config = ModelConfig.from_params(params)
    init_sha256 = weights_sha256(inits)
    context = None
    if reads_segmentation:
        # before seeding: segmenting the scans must not move the stage's random draws
        key = (init_sha256["seg"], cohort_key, model_config.patch_size, model_config.cls_shape)
        if key not in _CONTEXT_CACHE:
            _CONTEXT_CACHE.clear()  # one entry: the ablation grid fine-tunes variant after variant from it
            segmenter, _ = load_model(inits["seg"])
            _CONTEXT_CACHE[key] = predicted_lesion_context(_stage1_segmenter(segmenter), records, model_config.cls_shape)
            del segmenter
            _release_cuda_cache()
        context = _CONTEXT_CACHE[key]

    seed_everything(engine.seed)
    model = DeepSC(model_config)
    if plan.stage == "finetune":
        model.load_stage_weights(inits["seg"] / "model.pt", inits["cls"] / "model.pt")
    dataset = ScanDataset(records, "train", lesion_patch_prob, engine.seed, flip_prob=flip_prob, lesion_context=context,
                          patch_sampling=patch_sampling_setting(params, STAGE_SECTION[stage]))
    adapter = DeepSCAdapter(plan, LossConfig.from_params(params, class_counts=counts))
    config = {
        "kind": "deepsc",
        "stage": stage,
        "task": plan.task,
        "image_only": plan.image_only,
        "classes": list(CLASSES),
        "model": model_config.to_dict(),
        "params": {k: params[k] for k in ("model", "loss", "preprocess", "train") if k in params},
        "settings_key": settings_key(stage, params),
        "data_key": cohort_key,
        "code_key": code_key(stage),
        "class_counts": counts,
        "init_from": {k: str(v) for k, v in inits.items()},
        "init_sha256": init_sha256,
        "engine": _jsonable(engine),
    }
    return PreparedStage(plan, model, dataset, adapter, engine, config)


LESION_CONTEXTS = ("predicted", "reference")
# {(stage-1 seg weights sha256, data key, patch size, cls shape): lesion maps}: the ablation
# variants that share a stage-1 segmentation do not run it over the training scans again (~20 s each)
_CONTEXT_CACHE: dict[tuple[Any, ...], dict[str, Any]] = {}


def lesion_context_source(params: Mapping[str, Any], stage: str = "finetune") -> str:
    """What the classifier's lesion map is made of in training: ``predicted`` (the stage-1
    segmentation of the whole scan, as at inference) or ``reference`` (the reference mask).

    ``finetune``: ``train.lesion_context`` (default predicted) completes the map outside the
    training patch. ``pretrain-cls``: ``train.pretrain_cls.lesion_context`` (default reference)
    is the whole map, as no segmentation path runs in that stage.
    """
    train = params.get("train", {}) or {}
    if stage == "pretrain-cls":
        key, source = "train.pretrain_cls.lesion_context", (train.get("pretrain_cls") or {}).get("lesion_context", "reference")
    else:
        key, source = "train.lesion_context", train.get("lesion_context", "predicted")
    if source not in LESION_CONTEXTS:
        raise ConfigError(f"{key} must be one of {', '.join(LESION_CONTEXTS)}, got {source!r}")
    return str(source)


def reads_stage1_segmentation(stage: str, params: Mapping[str, Any]) -> bool:
    """Whether ``stage`` trains its classifier on the stage-1 segmentation of the training scans
    (and so needs the pretrain-seg folder): a classifier that reads lesion maps, set to ``predicted``."""
    source = lesion_context_source(params, stage)  # checked even where no classifier reads it
    return stage_plan(stage, params).teacher_forcing and source == "predicted"


def _release_cuda_cache() -> None:
    """Hand the stage-1 segmenter's cached GPU memory back before the stage's own model trains."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stage1_segmenter(model: Any) -> Any:
    """``(Z, Y, X) image -> lesion probability`` with the seg path alone (stage-1 weights), on the
    non-overlapping grid: at inference the classifier's lesion input comes from the tiles too
    (``DeepSC.infer_scan``); only the reported lesion map uses sliding windows."""
    import torch

    from deepsc.inference import stitch_patch_predictions

    # under torchrun each process segments on its own GPU (fit() sets the device only later)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)

    def segment(image):
        with torch.no_grad():
            return stitch_patch_predictions(
                image, model.config.patch_size, 4,
                lambda batch: torch.sigmoid(model(None, batch.to(device), None, task="seg")["seg_logit"]))

    return segment


def train_stage(
    stage: str,
    preprocessed: Path,
    split: Path,
    out_dir: Path,
    params: Mapping[str, Any],
    init_from: Mapping[str, Path] | None = None,
    *,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> Path:
    """Train one stage on the ``train`` subset of the split; returns ``out_dir``.

    Args:
        stage: pretrain-seg | pretrain-cls | finetune.
        preprocessed: the preprocessed cohort folder (``index.csv``, ``cases/``).
        split: ``split.csv``.
        out_dir: output folder (created; an interrupted run there is resumed).
        params: the merged settings.
        init_from: for ``finetune``: ``{"seg": <pretrain-seg folder>, "cls": <pretrain-cls folder>}``.
        parent_run_id: MLflow run to nest this stage's run under (the ablation grid).
        progress: show a tqdm bar (loss, time left).
    """
    prepared = prepare_stage(stage, preprocessed, split, params, init_from)
    return run_tracked(prepared.model, prepared.dataset, prepared.adapter, prepared.engine, Path(out_dir), params,
                       prepared.config, run_name=prepared.plan.name, parent_run_id=parent_run_id, progress=progress)


def run_tracked(model, dataset, adapter, engine_config, out_dir: Path, params: Mapping[str, Any], config: Mapping[str, Any],
                *, run_name: str, parent_run_id: str | None = None, progress: bool = True) -> Path:
    """Fit inside one MLflow run (rank 0 only) and write ``config.json`` / ``run.json``.

    Shared by the DeepSC stages and the MONAI baselines.
    """
    from deepsc import tracking
    from deepsc.data.volume import atomic_write_bytes
    from deepsc.train.engine import fit

    out_dir.mkdir(parents=True, exist_ok=True)
    is_main = int(os.environ.get("RANK", "0")) == 0
    opened = (tracking.start_run(params, run_name, config["stage"], nested=parent_run_id is not None, parent_run_id=parent_run_id)
              if is_main else contextlib.nullcontext())
    with opened as run:
        run_id = run.info.run_id if run is not None else None
        log_metrics = (lambda epoch, record: tracking.log_metrics_per_epoch(record, epoch)) if is_main else None
        result = fit(model, dataset, adapter, engine_config, out_dir, log_metrics=log_metrics,
                     progress=progress, description=run_name, identity=run_identity(config))
        if is_main:
            final = {k: v for k, v in (result.history[-1] if result.history else {}).items()}
            atomic_write_bytes(out_dir / CONFIG_FILE, json.dumps({**config, "final": final}, indent=2, default=str).encode())
            atomic_write_bytes(out_dir / RUN_FILE, json.dumps({"run_id": run_id, "run_name": run_name, "stage": config["stage"]}, indent=2).encode())
            tracking.log_artifacts(out_dir)
    return out_dir


def run_identity(config: Mapping[str, Any]) -> dict[str, str]:
    """What makes two trainings the same run (a ``last.pt`` is resumed, a finished ablation
    variant re-used, only when it matches): the settings, data and code hashes and the sha256
    of every initial weight file, as recorded when the training started."""
    identity = {key: str(config[key]) for key in ("settings_key", "data_key", "code_key") if key in config}
    identity.update({f"init_{name}": digest for name, digest in sorted((config.get("init_sha256") or {}).items())})
    return identity


def check_patch_size(preprocessed_size: tuple[int, int, int], params: Mapping[str, Any]) -> None:
    """The cohort's patches must have the size the model is built for."""
    wanted = tuple(int(v) for v in params.get("preprocess", {}).get("patch_size", preprocessed_size))
    if tuple(preprocessed_size) != wanted:
        raise ConfigError(f"the cohort was preprocessed with patch size {tuple(preprocessed_size)} but "
                          f"preprocess.patch_size is {wanted}; re-run preprocess")


def load_model(folder: Path, device: str = "cpu") -> tuple["torch.nn.Module", dict[str, Any]]:
    """Rebuild a trained model from ``folder/config.json`` + ``folder/model.pt`` (eval mode)."""
    from deepsc.train.engine import load_weights

    folder = Path(folder)
    config = read_config(folder)
    if config.get("kind", "deepsc") == "deepsc":
        from deepsc.model.network import DeepSC, ModelConfig

        model = DeepSC(ModelConfig.from_params(config["params"]))
    else:
        from deepsc.train.baselines import build_baseline

        model = build_baseline(config["kind"], config["params"])
    model.load_state_dict(load_weights(folder / "model.pt", device))
    return model.to(device).eval(), config


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a trained folder, with a clear error when it is not one."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file() or not (Path(folder) / "model.pt").is_file():
        raise InputError(str(folder), "is not a trained model folder (needs config.json and model.pt)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(str(path), f"is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("params"), dict):
        raise InputError(str(path), "has no 'params' mapping (the settings the model was built with): "
                                    "not written by deepsc train / deepsc baseline")
    return config


def _stage1_folders(stage: str, init_from: Mapping[str, Path] | None, needs_seg: bool = False) -> dict[str, Path]:
    """The stage-1 folders ``stage`` reads, checked: both for finetune; for pretrain-cls the
    pretrain-seg folder whose segmentation it reads (``needs_seg``; one given otherwise is not
    read, so a pipeline can always pass it); none for pretrain-seg."""
    given = {task: Path(path) for task, path in (init_from or {}).items()}
    if stage == "finetune":
        if set(given) != {"seg", "cls"}:
            raise ConfigError("finetune needs both stage-1 folders: --seg-init (pretrain-seg) and --cls-init (pretrain-cls)")
    elif stage == "pretrain-cls" and needs_seg:
        if set(given) != {"seg"}:
            raise ConfigError("pretrain-cls with train.pretrain_cls.lesion_context: predicted needs the pretrain-seg "
                              "folder whose segmentation the classifier reads (--seg-init), and no other")
    elif stage == "pretrain-cls" and set(given) <= {"seg"}:
        if given:
            log.info("pretrain-cls reads reference lesion masks (train.pretrain_cls.lesion_context); %s is not read", given["seg"])
        return {}
    else:
        if given:
            raise ConfigError(f"{stage} trains from scratch; init_from is only for finetune (and pretrain-cls's --seg-init)")
        return {}
    for task, folder in given.items():
        expected = f"pretrain-{task}"
        if read_config(folder).get("stage") != expected:
            raise InputError(str(folder), f"is not a {expected} model folder (config.json stage differs)")
    return given


def _dotted(params: Mapping[str, Any], key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _jsonable(value: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--preprocessed", type=Path, default=Path("outputs/preprocessed"))
    parser.add_argument("--split", type=Path, default=Path("outputs/split.csv"))
    parser.add_argument("--out", type=Path, required=True, help="output folder (resumed when it holds last.pt)")
    parser.add_argument("--seg-init", type=Path, default=None,
                        help="finetune, and pretrain-cls with train.pretrain_cls.lesion_context predicted: the pretrain-seg folder")
    parser.add_argument("--cls-init", type=Path, default=None, help="finetune: the pretrain-cls folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def run_cli(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    init_from = None
    if args.seg_init is not None or args.cls_init is not None:
        init_from = {k: v for k, v in (("seg", args.seg_init), ("cls", args.cls_init)) if v is not None}
    out = train_stage(args.stage, args.preprocessed, args.split, args.out, params, init_from, progress=not args.no_progress)
    print(out)
    return 0
