"""What a training budget buys: a sweep of settings over the real training stages.

Each variant is params.yaml plus dotted overrides. ``--stages seg`` trains stage 1 of the
segmentation path only; ``--stages all`` trains pretrain-seg, pretrain-cls and the joint
fine-tuning. Training is the real ``deepsc.train`` stage code (without MLflow, so it also runs
where mlflow is not installed, e.g. a bare GPU box). Every held-out scan is then run through the
model (non-overlapping patches; Dice also with left-right mirroring averaged in) and the table
gives mean Dice on the preprocessed grid over the scans with lesions (lesions cut to the lungs
as the pipeline reports them, ``inference.lesion_margin_mm``), accuracy and macro AUC,
next to the optimiser steps and wall time. Variants run as parallel processes (``--jobs``),
e.g. several on one GPU. ``NAME@E`` scales every stage's epochs by E / (pretrain-seg epochs).

    python benchmarks/budget_sweep.py --variants base paper_seg_loss --stages seg
    python benchmarks/budget_sweep.py --device cuda --jobs 8 --variants base focal10 base@120
    python benchmarks/budget_sweep.py --variants base lr2x --seeds 1 2 3 --jobs 2   # judged over seeds

This is a measurement, not a test: the README's training notes quote its tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},  # params.yaml as it is
    "paper_seg_loss": {"loss.lambda_deep": 0.0},  # L_seg on S_hat only (no deep supervision)
    "focal10": {"loss.lambda_focal": 10.0},
    "bce": {"loss.focal_gamma": 0.0},  # focal without the focusing term: alpha-weighted cross-entropy (nnU-Net's Dice + CE)
    "lr2x": {"train.pretrain_seg.lr": 2.0e-3},
    "lr3x": {"train.pretrain_seg.lr": 3.0e-3},
    "lesion_patches": {"train.lesion_patch_prob": 1.0},
    "grid_patches": {"train.pretrain_seg.patch_sampling": "grid"},  # stage-1 seg patches only at the tiles
    "random_finetune": {"train.finetune.patch_sampling": "random"},  # fine-tuning on random crops too
    "batch4": {"train.pretrain_seg.batch_size": 4},
    "wide": {"model.seg_widths": [24, 48, 96, 192]},
    "noflip": {"train.flip_prob": 0.0},
    "reference_context": {"train.lesion_context": "reference"},
    "cls32": {"preprocess.cls_slices": 32},  # needs a cohort preprocessed with it (--preprocessed)
    "cls_on_predicted": {"train.pretrain_cls.lesion_context": "predicted"},  # stage-1 classifier on stage-1 segmentations
    # the spread of one training run: the default settings with other seeds
    "seed1": {"train.seed": 1},
    "seed2": {"train.seed": 2},
    "seed3": {"train.seed": 3},
}


def held_out_scores(model: Any, config: dict[str, Any], preprocessed: Path, split: Path, device: str,
                    margin_mm: float = 0.0) -> dict[str, float]:
    """Dice (plain, mirror-averaged) over held-out scans with lesions; accuracy and AUC if classifying.

    The lesion mask is the one the pipeline reports (:func:`deepsc.diagnose.lesion_mask_from_probability`:
    inside the lungs grown by ``margin_mm``), on the preprocessed grid.
    """
    import numpy as np
    import torch

    from deepsc import CLASSES
    from deepsc.data.preprocess import load_case
    from deepsc.diagnose import lesion_mask_from_probability
    from deepsc.evaluate import test_cases
    from deepsc.inference import Predictor
    from deepsc.metrics import classification_metrics

    # the plain patch grid (inference.overlap 0): faster, and what the README's sweep tables used
    predictor = Predictor(model, config, device=device, mirror=False, overlap=0.0)
    mirroring = Predictor(model, config, device=device, mirror=True, overlap=0.0)
    plain, mirrored, labels, probs = [], [], [], []
    with torch.no_grad():
        for case in test_cases(preprocessed, split):
            data = load_case(case.case_dir, mmap=False)
            image = np.asarray(data.image, dtype=np.float32)
            cls = np.asarray(data.cls, dtype=np.float32)
            out = predictor.predict_case(image, cls, with_evidence=False, case_id=case.case_id)
            if out.class_prob is not None:
                labels.append(CLASSES.index(case.label))
                probs.append(out.class_prob)
            if out.lesion_prob is None or case.label == "normal" or not case.has_mask:
                continue
            truth = np.asarray(data.lesion) > 0
            for scores, prob in ((plain, out.lesion_prob),
                                 (mirrored, mirroring.predict_case(image, cls, with_evidence=False).lesion_prob)):
                pred = lesion_mask_from_probability(prob, np.asarray(data.lung), data.meta["spacing_mm"], margin_mm) > 0
                scores.append(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))
    scores = {"dsc": float(np.mean(plain)) if plain else float("nan"),
              "dsc_mirror": float(np.mean(mirrored)) if mirrored else float("nan")}
    if probs:
        metrics = classification_metrics(labels, np.stack(probs))
        scores.update(accuracy=float(metrics["accuracy"]), auc=float(metrics["auc_macro"]))
    return scores


def run_variant(name: str, overrides: dict[str, Any], scale: float | None, stages: str, preprocessed: str, split: str,
                out_root: str, device: str, threads: int, stage1: list[str] | None = None,
                evaluate_on: list[tuple[str, str]] | None = None, seg_from: str | None = None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)  # on CUDA too: the jobs share the host's cores
    from deepsc.config import apply_overrides, load_params
    from deepsc.inference import lesion_margin_setting
    from deepsc.train.engine import fit
    from deepsc.train.stages import CONFIG_FILE, STAGE_SECTION, prepare_stage

    params = apply_overrides(load_params(REPO / "params.yaml"), overrides)
    train = params["train"]
    if scale is not None:
        for section in STAGE_SECTION.values():
            train[section]["epochs"] = max(1, round(train[section]["epochs"] * scale))
    train["cpu_threads"] = threads if device == "cpu" else None
    chosen = ("pretrain-seg",) if stages == "seg" else ("pretrain-seg", "pretrain-cls", "finetune")
    row: dict[str, Any] = {"variant": name, "steps": 0, "train_s": 0.0}
    folders: dict[str, Path] = {}
    if stage1:  # fine-tune from existing stage-1 folders
        folders = {"pretrain-seg": Path(stage1[0]), "pretrain-cls": Path(stage1[1])}
        chosen = ("finetune",)
    elif seg_from:  # re-use a trained segmentation stage 1, train the classification stages
        folders = {"pretrain-seg": Path(seg_from)}
        chosen = ("pretrain-cls", "finetune")
    for stage in chosen:
        init = ({"seg": folders["pretrain-seg"], "cls": folders["pretrain-cls"]} if stage == "finetune"
                else {"seg": folders["pretrain-seg"]} if stage == "pretrain-cls" else None)
        prepared = prepare_stage(stage, Path(preprocessed), Path(split), params, init)
        folders[stage] = Path(out_root) / name / stage
        section = train[STAGE_SECTION[stage]]
        started = time.perf_counter()
        result = fit(prepared.model, prepared.dataset, prepared.adapter, prepared.engine, folders[stage], progress=False,
                     description=f"{name} {stage}", identity={"variant": json.dumps(overrides, sort_keys=True)})
        row["train_s"] += time.perf_counter() - started
        # what run_tracked writes besides MLflow: fine-tuning checks the stage-1 folders by it
        (folders[stage] / CONFIG_FILE).write_text(json.dumps(prepared.config, default=str))
        row["steps"] += section["epochs"] * -(-len(prepared.dataset) // section["batch_size"])
        row[f"epochs_{stage}"] = section["epochs"]
        if stage == "pretrain-seg":
            row["train_dice"] = float((result.history[-1] if result.history else {}).get("dice", float("nan")))
    row.setdefault("epochs_pretrain-seg", 0)
    row.setdefault("train_dice", float("nan"))
    dev = next(prepared.model.parameters()).device.type
    for number, (eval_preprocessed, eval_split) in enumerate(evaluate_on or [(preprocessed, split)]):
        scores = held_out_scores(prepared.model, prepared.config, Path(eval_preprocessed), Path(eval_split), dev,
                                 lesion_margin_setting(params))
        row.update({(f"{key}_{number}" if number else key): value for key, value in scores.items()})
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["base", "paper_seg_loss"], help=f"known: {', '.join(VARIANTS)}; "
                        "NAME@E trains E pretrain-seg epochs (the other stages scaled alike)")
    parser.add_argument("--stages", choices=("seg", "cls", "all"), default="seg",
                        help="cls: pretrain-cls and finetune from the stage-1 segmentation in --seg-from")
    parser.add_argument("--seg-from", default=None, help="with --stages cls: a trained pretrain-seg folder")
    parser.add_argument("--preprocessed", default="outputs/preprocessed")
    parser.add_argument("--split", default="outputs/split.csv")
    parser.add_argument("--out", default="outputs/budget_sweep")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job on CPU")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="run every variant once per train.seed (labels NAME_sSEED): the spread a setting has to beat")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--stage1", nargs=2, metavar=("SEG_DIR", "CLS_DIR"), default=None,
                        help="with --stages all: fine-tune only, from these trained stage-1 folders")
    parser.add_argument("--evaluate-on", nargs=2, metavar=("PREPROCESSED", "SPLIT"), action="append", default=None,
                        help="score on the test scans of this preprocessed cohort (e.g. an independent one) "
                             "instead of --preprocessed; repeat for several (scores of the n-th get the suffix _n)")
    args = parser.parse_args(argv)
    if (args.stages == "cls") != bool(args.seg_from):
        parser.error("--stages cls and --seg-from go together")

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from deepsc.config import load_params

    seg_epochs = load_params(REPO / "params.yaml")["train"]["pretrain_seg"]["epochs"]
    jobs = []
    for spec in args.variants:
        name, _, epochs = spec.partition("@")
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        scale = int(epochs) / seg_epochs if epochs else None
        for seed in args.seeds or [None]:
            label, overrides = spec.replace("@", "_e"), dict(VARIANTS[name])
            if seed is not None:
                label, overrides = f"{label}_s{seed}", {**overrides, "train.seed": seed}
            jobs.append((label, overrides, scale))
    # spawn: a forked child must not inherit a CUDA context
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_variant, label, overrides, scale, args.stages, args.preprocessed, args.split,
                               args.out, args.device, args.threads, args.stage1, args.evaluate_on, args.seg_from): label
                   for label, overrides, scale in jobs}
        rows, failed = [], []
        for future in as_completed(futures):
            try:
                row = future.result()
            except Exception as exc:  # report at once; the other variants go on
                failed.append(futures[future])
                print(f"variant {futures[future]} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                continue
            rows.append(row)
            print(json.dumps(row), flush=True)
    rows.sort(key=lambda r: [label for label, _, _ in jobs].index(r["variant"]))
    extra = sorted({k for r in rows for k in r if k.rsplit("_", 1)[-1].isdigit() and not k.startswith("epochs")})
    print(f"\n{'variant':<18}{'seg ep':>7}{'steps':>7}{'train s':>9}{'train dice':>11}{'test DSC':>9}{'+mirror':>9}"
          f"{'acc':>7}{'AUC':>7}" + "".join(f"{k:>14}" for k in extra))
    for r in rows:
        print(f"{r['variant']:<18}{r['epochs_pretrain-seg']:>7}{r['steps']:>7}{r['train_s']:>9}{r['train_dice']:>11}"
              f"{r['dsc']:>9}{r['dsc_mirror']:>9}{r.get('accuracy', float('nan')):>7}{r.get('auc', float('nan')):>7}"
              + "".join(f"{r.get(k, float('nan')):>14}" for k in extra))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
