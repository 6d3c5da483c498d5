"""Fetch one data version: the cohort that `data.dvc` pins at a git revision, and its settings.

Used by the first Kubeflow step (and usable by hand): the cohort comes from the repository's
DVC remote (S3 through boto3 on a cluster; any DVC remote works), the settings from the
repository's params.yaml at the same revision, so a pipeline run is pinned to exact data and
settings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from deepsc.errors import ConfigError, DeepSCError


def fetch_cohort(repo: str, rev: str, out_dir: Path, data_path: str = "data") -> Path:
    """Download the DVC-tracked `data_path` of `repo` at `rev` into `out_dir` (replaced)."""
    from dvc.repo import Repo

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        Repo.get(repo, data_path, out=str(out_dir), rev=rev or None)
    except Exception as exc:  # dvc raises many types; the user needs repo, rev and the reason
        raise DeepSCError(f"cannot fetch '{data_path}' from {repo} at revision {rev or 'HEAD'}: {exc}") from None
    if not (out_dir / "manifest.csv").is_file():
        raise DeepSCError(f"{repo}@{rev}: the fetched '{data_path}' has no manifest.csv")
    return out_dir


def resolve_provenance(repo: str, rev: str) -> dict[str, str]:
    """``{"git_commit", "data_version", "repo"}`` of `repo` at `rev`: the commit the revision
    resolves to (a branch moves; the commit does not) and the md5 its ``data.dvc`` pins. The
    Kubeflow steps tag their MLflow runs with them (``params["provenance"]``)."""
    import dvc.api
    from dvc.repo import Repo

    from deepsc.tracking import data_version_of

    try:
        with Repo.open(repo, rev=rev or None) as opened:
            commit = opened.get_rev()
        text = dvc.api.read("data.dvc", repo=repo, rev=commit)
    except Exception as exc:  # dvc raises many types; the user needs repo, rev and the reason
        raise DeepSCError(f"cannot resolve revision {rev or 'HEAD'} of {repo}: {exc}") from None
    return {"git_commit": str(commit), "data_version": data_version_of(text, f"{repo}@{commit}:data.dvc"), "repo": str(repo)}


def resolve_params(repo: str, rev: str, profile: str = "", overrides_json: str = "{}") -> dict[str, Any]:
    """params.yaml of `repo` at `rev`, with a profile and dotted JSON overrides applied."""
    import tempfile

    import dvc.api

    from deepsc.config import apply_overrides, load_params

    try:
        text = dvc.api.read("params.yaml", repo=repo, rev=rev or None)
    except Exception as exc:
        raise DeepSCError(f"cannot read params.yaml from {repo} at revision {rev or 'HEAD'}: {exc}") from None
    try:
        overrides = json.loads(overrides_json or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"overrides must be a JSON object of dotted keys: {exc}") from None
    if not isinstance(overrides, dict):
        raise ConfigError("overrides must be a JSON object of dotted keys")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text)
        params = load_params(path, profile or None)
    return apply_overrides(params, overrides)
