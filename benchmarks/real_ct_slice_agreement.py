"""Slice-level agreement of `deepsc diagnose` with radiologists' labels on a real scan.

Runs the one diagnosis function on a DICOM series with a slice-label CSV (COVID-CT-MD style:
`slice_index,infection`, index 0 = InstanceNumber 1) and prints the agreement of the predicted
per-slice lesion calls, the decision, time and peak memory. A script, not a test: it needs a
trained model folder.

    python benchmarks/real_ct_slice_agreement.py ../shared/real-ct/covid-ct-md/P002 \
        ../shared/real-ct/covid-ct-md/P002_slice_labels.csv --model outputs/models/finetune
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--model", default="outputs/models/finetune")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    import pandas as pd

    from deepsc.config import load_params
    from deepsc.diagnose import diagnose, peak_rss_mb

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = diagnose(args.scan, args.model, Path(out), load_params(args.params), progress=False)
    seconds = time.perf_counter() - start
    labels = pd.read_csv(args.labels)
    truth = {int(row.slice_index) + 1: bool(row.infection) for row in labels.itertuples()}
    calls = [c for c in result["slices"]["calls"] if c["instance_number"] in truth]
    pairs = [(truth[c["instance_number"]], c["lesion"]) for c in calls]
    tp = sum(t and p for t, p in pairs)
    tn = sum(not t and not p for t, p in pairs)
    positives = sum(t for t, _ in pairs)
    report = {
        "decision": (result.get("classification") or {}).get("decision"),
        "probabilities": (result.get("classification") or {}).get("probabilities"),
        "severity": result.get("severity"),
        "slices_compared": len(pairs),
        "slice_accuracy": (tp + tn) / len(pairs) if pairs else None,
        "slice_sensitivity": tp / positives if positives else None,
        "slice_specificity": tn / (len(pairs) - positives) if len(pairs) > positives else None,
        "lung_volume_ml": result.get("lesions", {}).get("lung_volume_ml"),
        "seconds": round(seconds, 1),
        "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
