"""Step 1: the cohort pinned by data.dvc at a git revision, and the settings of that revision."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fetch_data(
    repo_url: str,
    data_version: str,
    profile: str,
    overrides_json: str,
    mlflow_tracking_uri: str,
    cohort: Output[Dataset],
    params: Output[Artifact],
):
    """Pull `data/` from the repository's DVC remote at `data_version`; resolve params.yaml."""
    from pathlib import Path

    import pandas as pd

    from deepsc.config import dump_resolved
    from deepsc.data.fetch import fetch_cohort, resolve_params, resolve_provenance

    pinned = resolve_provenance(repo_url, data_version)  # a branch name moves: fetch the commit it names now
    settings = resolve_params(repo_url, pinned["git_commit"], profile, overrides_json)
    settings["provenance"] = pinned  # the MLflow tags of every later step (no .git in their container)
    if mlflow_tracking_uri:
        settings["mlflow"]["tracking_uri"] = mlflow_tracking_uri
    dump_resolved(settings, params.path)
    fetch_cohort(repo_url, pinned["git_commit"], Path(cohort.path))
    manifest = pd.read_csv(Path(cohort.path) / "manifest.csv")
    cohort.metadata.update({"data_version": pinned["data_version"], "git_commit": pinned["git_commit"], "cases": len(manifest),
                            **{f"n_{k}": int(v) for k, v in manifest["label"].value_counts().items()}})
    params.metadata["profile"] = settings["profile"]
