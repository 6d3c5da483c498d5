"""Step 8: Table II metrics on the held-out split at full scan size."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(
    cohort: Input[Dataset],
    model: Input[Model],
    preprocessed: Input[Dataset],
    split_table: Input[Dataset],
    params: Input[Artifact],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    report: Output[HTML],
):
    """Evaluate the model; scalar metrics, ROC curves and the confusion matrix go to the KFP UI."""
    import json
    import shutil
    from pathlib import Path

    import pandas as pd

    from deepsc import CLASSES
    from deepsc.config import load_params
    from deepsc.evaluate import evaluate_model

    out = Path(evaluation.path)
    evaluate_model(Path(model.path), Path(preprocessed.path), Path(split_table.path), out, load_params(params.path),
                   manifest=Path(cohort.path) / "manifest.csv")
    summary = json.loads((out / "metrics.json").read_text())
    for key, value in summary.items():
        if isinstance(value, (int, float)) and value == value:
            metrics.log_metric(key, float(value))
    confusion = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    classification.log_confusion_matrix(list(CLASSES), confusion.loc[list(CLASSES), list(CLASSES)].values.tolist())
    roc = pd.read_csv(out / "roc.csv")
    covid = roc[roc["class"] == CLASSES[0]]
    classification.log_roc_curve(covid["fpr"].tolist(), covid["tpr"].tolist(), covid["threshold"].tolist())
    shutil.copyfile(out / "report.html", report.path)
