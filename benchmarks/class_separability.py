"""How separable COVID-19 and CAP are on a cohort, given the reference lesion masks.

A reference point for the classification accuracy a model can be asked for: classical
classifiers (logistic regression, random forest) are trained on the lesion statistics that
``deepsc analyze`` measures from the REFERENCE masks (the paper's Fig. 1 features: lesion count,
LVR, volume, HU band fractions, spread, peripheral ratio at 0..35 mm) and scored on scans they
did not see. Normal scans have no reference lesions, so with the reference masks they are never
mistaken: the 3-class accuracy counts them as correct, and only COVID-19 vs CAP can go wrong.

This uses information no image model has at inference (the true lesion masks), but only as
summary statistics: it is neither an upper bound nor a target, it says how much the classes
overlap in the features that define them (the synthetic cohort overlaps them on purpose,
see ``deepsc.data.synth_lesions``).

    python benchmarks/class_separability.py --analysis outputs/analysis/per_case.csv \
        --split outputs/split.csv [--independent /tmp/cohort2/outputs/analysis/per_case.csv] \
        [--predictions outputs/evaluation/per_case.csv]

Protocols: (1) fit on the split's train scans, score its test scans (the pipeline's held-out
set); (2) repeated stratified 5-fold cross-validation over all lesion scans of the cohort;
(3) with ``--independent``, fit on the whole cohort and score the other cohort. With
``--predictions`` (an evaluation's ``per_case.csv``) every scan the model misclassified is listed
with the feature classifiers' probability of its true class.

This is a measurement, not a test: the README quotes its table.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

LESION_CLASSES = ("covid", "cap")
NON_FEATURES = ("case_id", "label", "lung_ml")  # lung_ml describes the lung, not the disease


def load_features(path: Path) -> Any:
    """The analysis table of one cohort: COVID-19 / CAP rows, numeric feature columns."""
    import pandas as pd

    table = pd.read_csv(path)
    missing = {"case_id", "label", "lesion_count"} - set(table.columns)
    if missing:
        raise SystemExit(f"{path}: not a `deepsc analyze` per_case.csv (missing {', '.join(sorted(missing))})")
    table = table[table["label"].isin(LESION_CLASSES)].reset_index(drop=True)
    if table.empty:
        raise SystemExit(f"{path}: holds no COVID-19 or CAP scans")
    return table


def feature_columns(table: Any) -> list[str]:
    return [c for c in table.columns if c not in NON_FEATURES and table[c].dtype.kind in "if"]


def classifiers(seed: int) -> dict[str, Any]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logistic regression": make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000)),
        "random forest": RandomForestClassifier(n_estimators=500, min_samples_leaf=2, random_state=seed),
    }


def fit_and_score(model: Any, train: Any, test: Any, columns: list[str]) -> tuple[float, Any]:
    """Lesion-scan accuracy on ``test`` and each test scan's probability of its true class."""
    import numpy as np

    model.fit(train[columns].to_numpy(), train["label"].to_numpy())
    probs = model.predict_proba(test[columns].to_numpy())
    classes = list(model.classes_)
    truth = np.array([classes.index(label) for label in test["label"]])
    return float((probs.argmax(axis=1) == truth).mean()), probs[np.arange(len(test)), truth]


def three_class_accuracy(lesion_accuracy: float, n_lesion: int, n_normal: int) -> float:
    """Normal scans (no reference lesions) counted correct, COVID-19 / CAP as scored."""
    return (lesion_accuracy * n_lesion + n_normal) / (n_lesion + n_normal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analysis", type=Path, default=Path("outputs/analysis/per_case.csv"))
    parser.add_argument("--split", type=Path, default=Path("outputs/split.csv"))
    parser.add_argument("--independent", type=Path, help="another cohort's analysis per_case.csv")
    parser.add_argument("--independent-normals", type=int, default=30, help="normal scans of that cohort")
    parser.add_argument("--predictions", type=Path, help="an evaluation's per_case.csv (the held-out scans)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    from sklearn.model_selection import RepeatedStratifiedKFold

    for path in (args.analysis, args.split, args.independent, args.predictions):
        if path is not None and not path.is_file():
            raise SystemExit(f"{path}: no such file")
    table = load_features(args.analysis)
    columns = feature_columns(table)
    split = pd.read_csv(args.split)
    subset = dict(zip(split["case_id"], split["subset"]))
    train = table[table["case_id"].map(subset) == "train"]
    test = table[table["case_id"].map(subset) == "test"].reset_index(drop=True)
    n_test_normal = int(((split["subset"] == "test") & (split["label"] == "normal")).sum())
    other = load_features(args.independent) if args.independent else None

    print(f"features ({len(columns)}): {', '.join(columns)}")
    print(f"cohort: {len(table)} lesion scans ({len(train)} train, {len(test)} held-out + {n_test_normal} normal held-out)")
    rows, true_class_prob = [], {}
    for name, model in classifiers(args.seed).items():
        row: dict[str, Any] = {"classifier": name}
        accuracy, probs = fit_and_score(model, train, test, columns)
        true_class_prob[name] = probs
        row["held-out COVID/CAP"] = accuracy
        row["held-out 3-class"] = three_class_accuracy(accuracy, len(test), n_test_normal)
        folds = RepeatedStratifiedKFold(n_splits=5, n_repeats=args.repeats, random_state=args.seed)
        scores = [fit_and_score(model, table.iloc[a], table.iloc[b], columns)[0] for a, b in folds.split(table, table["label"])]
        row["CV COVID/CAP"] = f"{np.mean(scores):.3f} ({np.std(scores):.3f})"
        if other is not None:
            accuracy, _ = fit_and_score(model, table, other, columns)
            row["independent COVID/CAP"] = accuracy
            row["independent 3-class"] = three_class_accuracy(accuracy, len(other), args.independent_normals)
        rows.append(row)
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))

    if args.predictions:
        predictions = pd.read_csv(args.predictions)
        wrong = predictions[~predictions["correct"].astype(bool)]
        print(f"\n{len(wrong)} of {len(predictions)} scans misclassified by the model:")
        by_case = {case: i for i, case in enumerate(test["case_id"])}
        lines = []
        for row in wrong.itertuples():
            i = by_case.get(row.case_id)
            line = {"case_id": row.case_id, "label": row.label, "predicted": row.predicted,
                    f"p({row.label}) model": getattr(row, f"prob_{row.label}")}
            for name, probs in true_class_prob.items():
                line[f"p(true) {name}"] = None if i is None else float(probs[i])
            if i is not None:
                line.update({k: test.loc[i, k] for k in ("lesion_count", "lvr", "hu_fraction_consolidation_band", "plr_15mm")})
            lines.append(line)
        print(pd.DataFrame(lines).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
