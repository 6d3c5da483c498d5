"""The paper's ablation grid (Fig. 8, Fig. 9, Table III and the single-task models).

Each variant in ``params["ablation"]["variants"]`` is a set of dotted overrides of params.yaml
(e.g. ``{"loss.lambda_ta": 0.0}``). Every variant is fine-tuned from the SAME stage-1
checkpoints (``--seg-init`` / ``--cls-init``) so that only the ablated setting differs.
A variant that changes what stage 1 depends on (``model.inception: false`` changes both
inception blocks; ``train.task: cls``, the ``w/o Seg`` model, pre-trains its classifier without
the reference lesion masks) gets its own stage-1 models, pre-trained once and cached under
``<out>/_pretrain/<stage>-<settings hash>/`` (:data:`deepsc.train.stages.STAGE_SETTINGS` lists
the settings in the hash). A cache folder that no variant of the grid in params.yaml would use
(left by an older setting) is deleted when the grid runs. Fine-tuning epochs are scaled by
``ablation.epochs_scale``.

All runs are nested MLflow runs under ONE parent run named ``ablation``; each variant writes
``<out>/<variant>/{model.pt, config.json, history.csv, last.pt, run.json}``, and the grid writes
``<out>/summary.csv`` (one row per variant: overrides, run id, final training metrics).
A variant whose folder already holds a finished model with the same settings, data, code and
stage-1 weights is not trained again, so an interrupted grid resumes where it stopped.

The same grid with DVC experiments
----------------------------------
Every override key is a key of params.yaml (``tests/test_ablation.py`` checks it), so each
variant is also one DVC experiment of the ``finetune`` stage, e.g.::

    dvc exp run --queue -n lambda_ta_0 -S loss.lambda_ta=0
    dvc exp run --queue -n lambda_ta_1 -S loss.lambda_ta=1
    dvc exp run --queue -n lambda_ta_100 -S loss.lambda_ta=100
    dvc exp run --queue -n single_scale_ta -S loss.ta_scales=single
    dvc exp run --queue -n no_cross_stitch -S model.cross_stitch=false
    dvc exp run --queue -n no_inception -S model.inception=false      # re-runs stage 1 too
    dvc exp run --queue -n seg_only -S train.task=seg
    dvc exp run --queue -n cls_only -S train.task=cls               # re-runs pretrain-cls, image-only
    dvc exp run --run-all && dvc exp show

:func:`dvc_queue_commands` prints these lines from params.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from deepsc.errors import ConfigError

log = logging.getLogger(__name__)

SUMMARY = "summary.csv"
PRETRAIN_CACHE = "_pretrain"


def ablation_variants(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The grid ``{variant: {dotted key: value}}`` from ``params["ablation"]["variants"]``."""
    section = params.get("ablation")
    variants = section.get("variants") if isinstance(section, Mapping) else None
    if not isinstance(variants, Mapping) or not variants:
        raise ConfigError("params.yaml has no ablation.variants")
    for name, overrides in variants.items():
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ConfigError(f"ablation variant {name!r} must map dotted settings to values ({{}} = as configured)")
    return {str(name): dict(overrides or {}) for name, overrides in variants.items()}


def variant_params(params: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the variant's overrides and the grid's fine-tuning epoch scale applied."""
    from deepsc.config import apply_overrides

    result = apply_overrides(params, overrides)
    scale = float(params.get("ablation", {}).get("epochs_scale", 1.0))
    if scale <= 0:
        raise ConfigError(f"ablation.epochs_scale must be positive, got {scale}")
    finetune = result["train"]["finetune"]
    finetune["epochs"] = max(1, int(round(finetune["epochs"] * scale)))
    return result


def dvc_queue_commands(params: Mapping[str, Any]) -> list[str]:
    """One ``dvc exp run --queue`` line per variant (params.yaml keys set with ``-S``)."""
    lines = []
    for name, overrides in ablation_variants(params).items():
        sets = " ".join(f"-S {key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in overrides.items())
        lines.append(f"dvc exp run --queue -n {name} {sets}")
    return lines


def run_ablation_grid(
    preprocessed: Path,
    split: Path,
    out_dir: Path,
    params: Mapping[str, Any],
    variants: Sequence[str] | None = None,
    init_from: Mapping[str, Path] | None = None,
    *,
    progress: bool = True,
) -> "pandas.DataFrame":
    """Fine-tune every variant (or the named ones) and return the summary (also ``summary.csv``).

    Args:
        preprocessed, split: the cohort and its split.
        out_dir: grid folder; ``<out_dir>/<variant>/`` per variant.
        params: the merged settings (the unablated baseline).
        variants: names from ``ablation.variants``; None = all of them.
        init_from: ``{"seg": folder, "cls": folder}`` - the baseline's stage-1 models, re-used by
            every variant whose stage-1 settings agree with theirs. None = pre-train as needed.
    """
    import pandas as pd

    from deepsc import tracking
    from deepsc.data.volume import atomic_write_bytes

    grid = ablation_variants(params)
    names = list(grid) if variants is None else list(variants)
    unknown = [n for n in names if n not in grid]
    if unknown:
        raise ConfigError(f"unknown ablation variant(s) {', '.join(unknown)} (known: {', '.join(grid)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in stale_pretrain_folders(out_dir, params):
        log.info("ablation: deleting %s (stage-1 cache of settings no variant uses any more)", stale)
        shutil.rmtree(stale)
    rows = []
    with tracking.start_run(params, "ablation", "ablation") as parent:
        parent_id = parent.info.run_id
        for name in names:
            rows.append(_run_variant(name, grid[name], preprocessed, split, out_dir, params, init_from, parent_id, progress))
            summary = pd.DataFrame(rows)
            atomic_write_bytes(out_dir / SUMMARY, summary.to_csv(index=False).encode())  # grows as variants finish
        tracking.log_artifacts(out_dir / SUMMARY)
    return summary


def stale_pretrain_folders(out_dir: Path, params: Mapping[str, Any]) -> list[Path]:
    """Stage-1 cache folders under ``<out_dir>/_pretrain`` that no variant of ``params``' grid
    would use: each cache is named by its settings hash, so these are left from older settings."""
    from deepsc.train.stages import settings_key

    cache = Path(out_dir) / PRETRAIN_CACHE
    if not cache.is_dir():
        return []
    wanted = {f"{stage}-{settings_key(stage, vparams)[:12]}"
              for vparams in (variant_params(params, overrides) for overrides in ablation_variants(params).values())
              for stage in ("pretrain-seg", "pretrain-cls")}
    # "<name>-from-<sha>": a classifier pre-trained on a stage-1 segmentation's lesion maps
    return [folder for folder in sorted(cache.iterdir())
            if folder.is_dir() and folder.name.startswith("pretrain-") and folder.name.split("-from-")[0] not in wanted]


def _run_variant(name, overrides, preprocessed, split, out_dir, params, init_from, parent_id, progress) -> dict[str, Any]:
    from deepsc.train.stages import RUN_FILE, train_stage

    started = time.perf_counter()
    vparams = variant_params(params, overrides)
    inits = {"seg": _stage1_model("seg", vparams, preprocessed, split, out_dir, init_from, parent_id, progress)}
    inits["cls"] = _stage1_model("cls", vparams, preprocessed, split, out_dir, init_from, parent_id, progress, seg_folder=inits["seg"])
    folder = out_dir / name
    if not _finished(folder, "finetune", vparams, preprocessed, split, inits):
        train_stage("finetune", preprocessed, split, folder, vparams, inits, parent_run_id=parent_id, progress=progress)
    else:
        log.info("ablation %s: already trained in %s", name, folder)
    config = json.loads((folder / "config.json").read_text())
    run = json.loads((folder / RUN_FILE).read_text())
    return {
        "variant": name,
        "overrides": json.dumps(overrides, sort_keys=True),
        "run_id": run.get("run_id"),
        "model_dir": str(folder),
        "seg_init": str(inits["seg"]),
        "cls_init": str(inits["cls"]),
        **{f"final_{k}": v for k, v in config.get("final", {}).items() if k != "epoch"},
        "seconds": round(time.perf_counter() - started, 2),
    }


def _stage1_model(task, vparams, preprocessed, split, out_dir, init_from, parent_id, progress, seg_folder=None) -> Path:
    """The stage-1 folder for ``task`` under the variant's settings: given, cached or new. A
    classifier pre-trained on predicted lesion maps also depends on ``seg_folder``'s weights."""
    from deepsc.train.stages import reads_stage1_segmentation, settings_key, train_stage, weights_sha256

    stage = f"pretrain-{task}"
    inits = {"seg": Path(seg_folder)} if reads_stage1_segmentation(stage, vparams) else None
    given = Path(init_from[task]) if init_from and task in init_from else None
    if given is not None and _finished(given, stage, vparams, preprocessed, split, inits):
        return given
    name = f"{stage}-{settings_key(stage, vparams)[:12]}"
    if inits:  # one cache per stage-1 segmentation it read
        name += f"-from-{weights_sha256(inits)['seg'][:12]}"
    cache = out_dir / PRETRAIN_CACHE / name
    if not _finished(cache, stage, vparams, preprocessed, split, inits):
        log.info("ablation: stage-1 settings differ from %s; pre-training %s in %s", given, stage, cache)
        train_stage(stage, preprocessed, split, cache, vparams, inits, parent_run_id=parent_id, progress=progress)
    return cache


def _finished(folder: Path, stage: str, params: Mapping[str, Any], preprocessed: Path, split: Path,
              inits: Mapping[str, Path] | None = None) -> bool:
    """True when ``folder`` holds a finished ``stage`` model trained with these settings, data,
    code and (fine-tuning) stage-1 weights ``inits``: a re-run after any of them changed trains again."""
    from deepsc.train.stages import CONFIG_FILE, RUN_FILE, code_key, data_key, run_identity, settings_key, weights_sha256

    config_path = Path(folder) / CONFIG_FILE
    if not (config_path.is_file() and (Path(folder) / "model.pt").is_file() and (Path(folder) / RUN_FILE).is_file()):
        return False
    config = json.loads(config_path.read_text())
    wanted = {"settings_key": settings_key(stage, params), "data_key": data_key(Path(preprocessed), Path(split)),
              "code_key": code_key(stage), "init_sha256": weights_sha256(inits or {})}
    return config.get("stage") == stage and run_identity(config) == run_identity(wanted)


# --------------------------------------------------------------------------- CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preprocessed", type=Path, default=Path("outputs/preprocessed"))
    parser.add_argument("--split", type=Path, default=Path("outputs/split.csv"))
    parser.add_argument("--seg-init", type=Path, default=None, help="the baseline's pretrain-seg folder")
    parser.add_argument("--cls-init", type=Path, default=None, help="the baseline's pretrain-cls folder")
    parser.add_argument("--out", type=Path, default=Path("outputs/ablation"))
    parser.add_argument("--variant", action="append", default=None, help="run only this variant (repeatable)")
    parser.add_argument("--print-dvc", action="store_true", help="print the equivalent `dvc exp run --queue` lines and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def run_cli(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    if args.print_dvc:
        print("\n".join(dvc_queue_commands(params)))
        return 0
    init_from = {k: v for k, v in (("seg", args.seg_init), ("cls", args.cls_init)) if v is not None} or None
    summary = run_ablation_grid(args.preprocessed, args.split, args.out, params, args.variant, init_from,
                                progress=not args.no_progress)
    print(summary.to_string(index=False))
    return 0
