"""Could a classifier on DeepSC's own lesion masks diagnose better than DeepSC's classifier?

``class_separability.py`` measures how far COVID-19 and CAP overlap in the lesion statistics of
the REFERENCE masks. This script asks the question a user of the trained model would ask: run
every scan through ``deepsc diagnose``'s core (:func:`deepsc.diagnose.diagnose_volume`: lung
segmentation, preprocessing, the model with the pipeline's inference settings, lesions mapped
back to the scan), measure the same statistics (:func:`deepsc.data.analysis.case_lesion_stats`:
count, LVR, volume, HU bands, spread, peripheral ratio at 0..35 mm) on the PREDICTED lesions
inside the PREDICTED lungs, and train classical 3-class classifiers on them (normal scans
included: a scan without predicted lesions has zero statistics).

The classifiers are fitted on the split's training scans, the ones the model was trained on
(their predicted masks are better than a new scan's), and scored on the held-out scans and,
with ``--independent``, on every scan of another cohort. DeepSC's own decision on the same
scans is printed next to them.

    python benchmarks/predicted_lesion_statistics.py --model outputs/models/finetune \\
        --manifest data/manifest.csv --split outputs/split.csv \\
        [--independent /tmp/cohort2/data/manifest.csv] [--cache /tmp/predicted_stats]

Per-scan rows are cached as CSV in ``--cache`` (one file per cohort and model), so a second
run only refits. This is a measurement, not a test: the README quotes its table.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MODEL_COLUMNS = ("model_decision", "prob_covid", "prob_cap", "prob_normal")  # DeepSC's own output, not a feature


def predicted_rows(model: Path, manifest: Path, params: dict[str, Any], cache: Path) -> Any:
    """One row per scan of ``manifest``: lesion statistics of the model's predicted lesions and
    the model's class probabilities (cached in ``cache``)."""
    import numpy as np
    import pandas as pd

    from deepsc import CLASSES
    from deepsc.data.analysis import case_lesion_stats
    from deepsc.data.io import read_ct
    from deepsc.data.manifest import load_manifest
    from deepsc.diagnose import diagnose_volume, load_predictor
    from deepsc.registry import file_sha256

    key = hashlib.sha256(f"{manifest.resolve()}|{file_sha256(model / 'model.pt')}".encode()).hexdigest()[:12]
    cached = cache / f"{manifest.parent.name}-{key}.csv"
    if cached.is_file():
        return pd.read_csv(cached)
    predictor, _ = load_predictor(model, params)
    rows = []
    table = load_manifest(manifest)
    started = time.perf_counter()
    for number, scan in enumerate(table.itertuples(), 1):
        volume = read_ct(scan.image_path, scan.case_id)
        result = diagnose_volume(volume, predictor, params, with_evidence=False)
        stats = case_lesion_stats(volume.array, result.lesion_mask > 0, result.lung_mask > 0, volume.spacing,
                                  scan.case_id, scan.label)
        probs = result.summary["classification"]["probabilities"]
        rows.append({**stats.row(), "model_decision": result.summary["classification"]["decision"],
                     **{f"prob_{name}": probs[name] for name in CLASSES}})
        print(f"\r{manifest.parent.name}: {number}/{len(table)} scans, {time.perf_counter() - started:.0f} s", end="", flush=True)
    print()
    frame = pd.DataFrame(rows).replace([np.inf, -np.inf], np.nan)
    cache.mkdir(parents=True, exist_ok=True)
    frame.to_csv(cached, index=False)
    return frame


def features(frame: Any, columns: list[str] | None = None) -> tuple[Any, list[str]]:
    """Numeric statistics, NaN (no predicted lesion: HU fractions, PLR, spread) as 0."""
    from class_separability import feature_columns

    if columns is None:
        columns = [c for c in feature_columns(frame) if c not in MODEL_COLUMNS]
    return frame[columns].fillna(0.0).to_numpy(), columns


def score(name: str, predicted: Any, frame: Any) -> dict[str, Any]:
    import numpy as np

    truth = frame["label"].to_numpy()
    lesion = np.isin(truth, ("covid", "cap"))
    wrong = predicted != truth
    return {"classifier": name, "3-class": float((~wrong).mean()),
            "COVID-19 / CAP scans": float((~wrong[lesion]).mean()),
            "normal scans": float((~wrong[~lesion]).mean()),
            "scans wrong": int(wrong.sum()),
            "of them DeepSC wrong too": int((wrong & (frame["model_decision"].to_numpy() != truth)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("outputs/models/finetune"))
    parser.add_argument("--manifest", type=Path, default=Path("data/manifest.csv"))
    parser.add_argument("--split", type=Path, default=Path("outputs/split.csv"))
    parser.add_argument("--independent", type=Path, help="another cohort's manifest (every scan is scored)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--cache", type=Path, default=Path("outputs/benchmarks/predicted_lesion_statistics"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import pandas as pd

    from class_separability import classifiers
    from deepsc.config import load_params

    params = load_params(args.params)
    cohort = predicted_rows(args.model, args.manifest, params, args.cache)
    subset = dict(pd.read_csv(args.split)[["case_id", "subset"]].itertuples(index=False))
    train = cohort[cohort["case_id"].map(subset) == "train"].reset_index(drop=True)
    tests = {"held-out": cohort[cohort["case_id"].map(subset) == "test"].reset_index(drop=True)}
    if args.independent:
        tests["independent"] = predicted_rows(args.model, args.independent, params, args.cache)
    x_train, columns = features(train)
    print(f"features ({len(columns)}): {', '.join(columns)}")
    print(f"fitted on {len(train)} training scans; DeepSC's training-scan accuracy "
          f"{(train['model_decision'] == train['label']).mean():.3f}")
    fitted = {name: model.fit(x_train, train["label"].to_numpy()) for name, model in classifiers(args.seed).items()}
    for test_name, test in tests.items():
        if test.empty:
            print(f"\n{test_name}: no scans")
            continue
        rows = [score("DeepSC (its own classifier)", test["model_decision"].to_numpy(), test)]
        rows += [score(f"{name} on predicted-lesion statistics", model.predict(features(test, columns)[0]), test)
                 for name, model in fitted.items()]
        print(f"\n{test_name}: {len(test)} scans")
        print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
