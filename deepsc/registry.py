"""MLflow model registry: log the model as a pyfunc, register it, promote it by aliases.

Promotion gate (:func:`promote`): a version becomes alias ``champion`` only if it does not regress
on held-out DSC (``dsc_mean``) or accuracy (``accuracy``) by more than ``register.tolerance``
(absolute, in the metric's own units: fractions in [0, 1]) against the current champion;
otherwise it becomes ``challenger``. The first version of a model is champion. ``force=True``
makes it champion and records who (``$USER``) and why. Aliases only, never the deprecated stages.

Version tags written here:

* ``model_sha256``: sha256 of ``model.pt``;
* ``serving_sha256``: sha256 of everything else the pyfunc serves: ``config.json``, the served
  settings (:data:`SERVED_SECTIONS` of params.yaml, which the pyfunc carries) and the ``deepsc``
  code it ships. Registration is idempotent on the pair: the same weights with a changed
  inference setting or changed code are a new version, gated on their own evaluation;
* ``promotion_decision`` (champion | challenger) and ``promotion_reason``: the decision taken when
  the version was promoted (where it stands now is what the aliases say);
* ``metric.dsc_mean``, ``metric.accuracy``: the version's gated metrics from its latest
  evaluation; later versions are compared with exactly these numbers. Registering the same
  version again with a new evaluation (same weights, settings and code, e.g. a changed test
  split) updates them, also on the champion, which keeps its alias: a candidate is never gated
  against numbers from an older evaluation;
* ``forced_by`` on a forced promotion; ``data_version``, ``git_commit`` from the run.

Both functions are idempotent: running them again for the same version (or the same model.pt)
registers nothing new and writes no tag or alias that is already in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from deepsc.errors import ConfigError, InputError

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
GATED_METRICS = {"dsc": "dsc_mean", "accuracy": "accuracy"}
"""``register.tolerance`` key -> the key of the metric in ``metrics.json``."""

TAG_DECISION = "promotion_decision"
TAG_REASON = "promotion_reason"
TAG_FORCED_BY = "forced_by"
TAG_SHA256 = "model_sha256"
TAG_SERVING = "serving_sha256"
SERVED_SECTIONS = ("inference", "lungseg", "validate")
"""The params.yaml sections the served pyfunc applies, as ``deepsc evaluate`` / ``diagnose`` do."""
METRIC_TAG_PREFIX = "metric."

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
DECISION_FILE = "decision.json"
MODEL_ARTIFACT = "model_dir"
"""Artifact key of the model folder (model.pt + config.json): ``context.artifacts["model_dir"]``
in ``DeepSCPyfunc.load_context``."""

PINNED_DISTRIBUTIONS = (
    "torch", "monai", "numpy", "nibabel", "scipy", "scikit-image", "pandas", "mlflow", "pydicom",
    "pylibjpeg", "pylibjpeg-libjpeg", "simpleitk",
)


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of :func:`promote`.

    Attributes:
        model_name, version: the registered model version decided on.
        alias: ``champion`` or ``challenger``, the alias the version holds afterwards.
        reason: why, in words (also the ``promotion_reason`` tag).
        previous_champion: the champion's version before the call (None if there was none).
        forced: promoted with ``force=True``.
        changed: whether the call wrote any alias or tag (False on a repeated call).
    """

    model_name: str
    version: str
    alias: str
    reason: str
    previous_champion: str | None
    forced: bool
    changed: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RegistrationResult:
    """Outcome of :func:`register_model`; ``created`` is False when model.pt was registered before."""

    model_name: str
    version: str
    run_id: str | None
    model_uri: str
    sha256: str
    created: bool
    decision: PromotionDecision

    @property
    def alias(self) -> str:
        return self.decision.alias

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "alias": self.alias}


# ----------------------------------------------------------------------------- promotion


def promote(
    client: Any,
    model_name: str,
    version: str | int,
    candidate_metrics: Mapping[str, Any],
    tolerance: Mapping[str, Any],
    force: bool = False,
    reason: str | None = None,
) -> PromotionDecision:
    """Give `version` the alias champion or challenger (rules in the module docstring).

    Args:
        client: an ``mlflow.MlflowClient`` of the registry.
        model_name, version: an existing registered model version.
        candidate_metrics: the version's held-out metrics; needs ``dsc_mean`` and ``accuracy``.
        tolerance: ``{"dsc": ..., "accuracy": ...}`` allowed regression (absolute, >= 0).
        force: make it champion regardless of the metrics (needs `reason`).
        reason: why it is forced (ignored when not forced).

    Raises:
        InputError: the version does not exist, or a gated metric is missing.
        ConfigError: bad tolerance, or force without a reason.
    """
    version = str(version)
    current = _get_version(client, model_name, version)
    allowed = _tolerance(tolerance)
    candidate = _gated_metrics(candidate_metrics, f"{model_name} v{version}")
    if force and not (reason and reason.strip()):
        raise ConfigError("a forced promotion needs a reason (--reason \"...\")")
    champion = _alias_version(client, model_name, CHAMPION)

    metric_tags = {f"{METRIC_TAG_PREFIX}{key}": repr(value) for key, value in candidate.items()}
    if champion == version:
        # Re-evaluated (same weights, new evaluation): the champion keeps its alias and reason, but
        # its metric tags follow the evaluation, so the next candidate is compared like with like.
        refreshed = _set_tags(client, model_name, version, current.tags, metric_tags)
        stored = current.tags.get(TAG_REASON) or "already the champion"
        if refreshed:
            stored += "; re-evaluated since: " + ", ".join(f"{key} {value:.4f}" for key, value in candidate.items())
            log.info("%s v%s (champion): %s", model_name, version, stored)
        return PromotionDecision(model_name, version, CHAMPION, stored, champion, bool(current.tags.get(TAG_FORCED_BY)), refreshed)

    tags = dict(metric_tags)
    if force:
        alias, why = CHAMPION, f"forced: {reason.strip()}"  # type: ignore[union-attr]
        tags[TAG_FORCED_BY] = os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"
    elif champion is None:
        alias, why = CHAMPION, "first version: there is no champion to compare with"
    else:
        alias, why = _compare(candidate, _champion_metrics(client, model_name, champion), allowed, champion)
    tags.update({TAG_DECISION: alias, TAG_REASON: why})

    changed = _set_tags(client, model_name, version, current.tags, tags)
    changed |= _set_alias(client, model_name, alias, version)
    if alias == CHAMPION and _alias_version(client, model_name, CHALLENGER) == version:
        client.delete_registered_model_alias(model_name, CHALLENGER)
        changed = True
    log.info("%s v%s -> %s: %s", model_name, version, alias, why)
    return PromotionDecision(model_name, version, alias, why, champion, force, changed)


def _compare(candidate: dict[str, float], champion: dict[str, float | None], allowed: dict[str, float], champion_version: str) -> tuple[str, str]:
    """(alias, reason): champion if no gated metric regresses by more than its tolerance."""
    passed, clauses = True, []
    for name, key in GATED_METRICS.items():
        new, old, tol = candidate[key], champion.get(key), allowed[name]
        if old is None or not math.isfinite(old):
            return CHALLENGER, (f"champion v{champion_version} has no recorded {key} to compare with; "
                                "promote with force and a reason if this version should replace it")
        ok = math.isfinite(new) and new >= old - tol - 1e-12
        passed &= ok
        clauses.append(f"{key} {new:.4f} {'>=' if ok else '<'} {old:.4f} - {tol:.4f}")
    verdict = "no regression beyond tolerance" if passed else "regression beyond tolerance"
    return (CHAMPION if passed else CHALLENGER), f"{verdict} vs champion v{champion_version}: {'; '.join(clauses)}"


def _champion_metrics(client: Any, model_name: str, version: str) -> dict[str, float | None]:
    """The champion's gated metrics: its ``metric.*`` tags, else its run's logged metrics."""
    champion = client.get_model_version(model_name, version)
    tagged = {key: champion.tags.get(f"{METRIC_TAG_PREFIX}{key}") for key in GATED_METRICS.values()}
    logged = _run_metrics(client, champion.run_id) if None in tagged.values() else {}
    return {key: float(value) if value is not None else logged.get(key) for key, value in tagged.items()}


def _run_metrics(client: Any, run_id: str | None) -> dict[str, float]:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    try:
        return dict(client.get_run(run_id).data.metrics)
    except MlflowException:
        return {}


def _get_version(client: Any, model_name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(model_name, version)
    except MlflowException:
        raise InputError(f"{model_name} v{version}", "no such registered model version") from None


def _alias_version(client: Any, model_name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def _set_tags(client: Any, model_name: str, version: str, existing: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    stale = {key: value for key, value in wanted.items() if existing.get(key) != value}
    for key, value in stale.items():
        client.set_model_version_tag(model_name, version, key, value)
    return bool(stale)


def _set_alias(client: Any, model_name: str, alias: str, version: str) -> bool:
    if _alias_version(client, model_name, alias) == version:
        return False
    client.set_registered_model_alias(model_name, alias, version)
    return True


def _tolerance(tolerance: Mapping[str, Any]) -> dict[str, float]:
    allowed = {}
    for name in GATED_METRICS:
        value = tolerance.get(name) if isinstance(tolerance, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"register.tolerance.{name} must be a number (allowed regression, e.g. 0.01), got {value!r}")
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"register.tolerance.{name} must be >= 0, got {value}")
        allowed[name] = value
    return allowed


def _gated_metrics(metrics: Mapping[str, Any], where: str) -> dict[str, float]:
    values = {}
    for key in GATED_METRICS.values():
        if key not in metrics:
            raise InputError(where, f"the evaluation metrics have no '{key}' (keys: {', '.join(sorted(metrics))})")
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise InputError(where, f"metric '{key}' is not a finite number: {value!r}")
        values[key] = float(value)
    return values


# ----------------------------------------------------------------------------- registration


def register_model(
    model_dir: Path,
    eval_dir: Path,
    params: Mapping[str, Any],
    force: bool = False,
    reason: str | None = None,
    *,
    python_model: Any | None = None,
) -> RegistrationResult:
    """Log the model as an MLflow pyfunc, register a version of ``register.model_name``, promote it.

    Args:
        model_dir: folder with ``model.pt`` (state dict) and ``config.json``.
        eval_dir: folder with ``metrics.json`` (needs ``dsc_mean`` and ``accuracy``).
        params: the merged settings (``register``, ``mlflow`` and the served sections; all are logged).
        force, reason: see :func:`promote`.
        python_model: the ``mlflow.pyfunc.PythonModel`` to log; default
            ``deepsc.serving.DeepSCPyfunc(params=served_settings(params))``, which finds the model
            folder at ``context.artifacts["model_dir"]``. The signature is
            ``deepsc.serving.model_signature()``.

    Returns:
        The version (new, or the existing one with the same ``model_sha256`` and
        ``serving_sha256``) and its decision.
    """
    from deepsc import tracking

    tracking.quiet_mlflow()
    import mlflow

    model_dir, eval_dir = Path(model_dir), Path(eval_dir)
    metrics = _read_metrics(eval_dir)
    _check_model_dir(model_dir)
    settings = _register_section(params)
    model_name = settings["model_name"]
    if force and not (reason and reason.strip()):
        raise ConfigError("a forced promotion needs a reason (--reason \"...\")")

    sha256 = file_sha256(model_dir / MODEL_FILE)
    served = served_settings(params)
    serving = serving_sha256(model_dir, served)
    client = mlflow.MlflowClient(tracking.configure(params))
    existing = find_version(client, model_name, sha256, serving)
    if existing is not None:
        log.info("%s v%s already serves this model.pt (sha256 %s) with these settings and code: not registering again",
                 model_name, existing.version, sha256[:12])
        version, run_id, created = str(existing.version), existing.run_id, False
    else:
        if python_model is None:
            from deepsc.serving import DeepSCPyfunc

            python_model = DeepSCPyfunc(params=served)
        identity = {TAG_SHA256: sha256, TAG_SERVING: serving}
        version, run_id = _log_and_register(client, model_dir, metrics, params, model_name, identity, python_model)
        created = True
    decision = promote(client, model_name, version, metrics, settings["tolerance"], force=force, reason=reason)
    return RegistrationResult(model_name, version, run_id, f"models:/{model_name}/{version}", sha256, created, decision)


def find_version(client: Any, model_name: str, sha256: str, serving: str) -> Any | None:
    """The oldest version of `model_name` tagged with this ``model_sha256`` and ``serving_sha256``, or None."""
    matches = [mv for mv in client.search_model_versions(f"name = '{model_name}'")
               if mv.tags.get(TAG_SHA256) == sha256 and mv.tags.get(TAG_SERVING) == serving]
    return min(matches, key=lambda mv: int(mv.version)) if matches else None


def served_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SERVED_SECTIONS` of `params` (JSON values): what the pyfunc applies to each scan."""
    return json.loads(json.dumps({key: params[key] for key in SERVED_SECTIONS if key in params}, default=str))


def serving_sha256(model_dir: Path, settings: Mapping[str, Any]) -> str:
    """sha256 of ``config.json``, the served settings and the ``deepsc`` sources the pyfunc ships."""
    import deepsc

    digest = hashlib.sha256()
    digest.update((Path(model_dir) / CONFIG_FILE).read_bytes() + b"\0")
    digest.update(json.dumps(settings, sort_keys=True).encode() + b"\0")
    package = Path(deepsc.__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _log_and_register(client: Any, model_dir: Path, metrics: Mapping[str, Any], params: Mapping[str, Any],
                      model_name: str, identity: Mapping[str, str], python_model: Any) -> tuple[str, str]:
    import mlflow

    from deepsc import tracking

    from deepsc.serving import model_signature

    sha256 = identity[TAG_SHA256]
    with tracking.start_run(params, f"register-{sha256[:12]}", "register") as run, tempfile.TemporaryDirectory() as tmp:
        tracking.log_metrics(metrics)
        mlflow.log_dict(dict(metrics), f"evaluation/{METRICS_FILE}")
        with warnings.catch_warnings():  # the signature is explicit; an example CT scan is too big to embed
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=python_model,
                artifacts={MODEL_ARTIFACT: str(model_dir)},
                code_paths=[str(_clean_package_copy(Path(tmp)))],
                signature=model_signature(),
                pip_requirements=pinned_requirements(),
            )
        run_tags = mlflow.get_run(run.info.run_id).data.tags
        provenance = {key: run_tags.get(key, "unknown") for key in ("data_version", "git_commit", "git_dirty")}
        mv = _create_version(client, model_name, info, run.info.run_id, {**identity, **provenance})
        card = model_card(model_name, str(mv.version), sha256, metrics, params, model_dir, provenance, run.info.run_id)
        mlflow.log_text(card, "model_card.md")
        client.update_model_version(model_name, mv.version, description=card)
    return str(mv.version), run.info.run_id


def _create_version(client: Any, model_name: str, info: Any, run_id: str, tags: Mapping[str, str]) -> Any:
    """A new version of `model_name` (created if needed) from a logged model, tagged at creation."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name, description="DeepSC-COVID: research use only, not for clinical diagnosis")
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return client.create_model_version(model_name, source=info.model_uri, run_id=run_id, tags=dict(tags), model_id=info.model_id)


def _clean_package_copy(tmp: Path) -> Path:
    """The deepsc package without bytecode, as the pyfunc's code path."""
    import deepsc

    source = Path(deepsc.__file__).resolve().parent
    target = tmp / "deepsc"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def pinned_requirements() -> list[str]:
    """``name==version`` of the installed serving stack (local labels such as ``+cpu`` dropped).

    A distribution that is not installed is left out with a warning rather than guessed.
    """
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in PINNED_DISTRIBUTIONS:
        try:
            pins.append(f"{name}=={version(name).split('+', 1)[0]}")
        except PackageNotFoundError:
            log.warning("%s is not installed: left out of the model's pip requirements", name)
    return pins


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_card(model_name: str, version: str, sha256: str, metrics: Mapping[str, Any], params: Mapping[str, Any],
               model_dir: Path, provenance: Mapping[str, str], run_id: str) -> str:
    """Markdown model card of one registered version."""
    import yaml

    config = _read_json(model_dir / CONFIG_FILE)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metric_rows = "\n".join(f"| {key} | {_number(value)} |" for key, value in sorted(scalars.items()))
    trained_on = {k: config[k] for k in ("stage", "class_counts", "data_key", "settings_key") if k in config}
    sections = {k: params[k] for k in ("paths", "synth", "split", "preprocess", "model", "loss", "train", *SERVED_SECTIONS,
                                       "evaluate", "register") if k in params}
    return f"""# {model_name} v{version}

DeepSC-COVID: joint 3D lung-lesion segmentation and COVID-19 / CAP / non-pneumonia classification
of chest CT (Wang et al., IEEE TMI 2021), re-implemented as the `deepsc` package.

## Intended use
Research, not for clinical diagnosis. Not a medical device; outputs must not guide the care of
any patient. Inputs: a non-contrast chest CT volume (HU). Outputs: class probabilities
(covid, cap, normal), a lesion mask and evidence maps.

## Provenance
- model.pt sha256: `{sha256}`
- MLflow run: `{run_id}`; git commit `{provenance.get('git_commit', 'unknown')}` (uncommitted changes: {provenance.get('git_dirty', 'unknown')})
- Training data: DVC-tracked `{params.get('paths', {}).get('data', 'data')}/`, data version `{provenance.get('data_version', 'unversioned')}`,
  manifest `{params.get('paths', {}).get('manifest', 'data/manifest.csv')}`; settings profile `{params.get('profile', 'default')}`.
  The default profile trains on the embedded synthetic cohort (`deepsc synth`), not on patient data.
- Training run: {json.dumps(trained_on, sort_keys=True) if trained_on else 'config.json has no training summary'}

## Evaluation of this version (held-out split)
| metric | value |
|---|---|
{metric_rows}

## Settings
```yaml
{yaml.safe_dump(sections, sort_keys=False).rstrip()}
```
"""


def _number(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(str(path), f"cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(str(path), "expected a JSON object")
    return data


def _read_metrics(eval_dir: Path) -> dict[str, Any]:
    path = eval_dir / METRICS_FILE
    if not path.is_file():
        raise InputError(str(eval_dir), f"no {METRICS_FILE}: run `deepsc evaluate` first")
    metrics = _read_json(path)
    _gated_metrics(metrics, str(path))
    return metrics


def _check_model_dir(model_dir: Path) -> None:
    missing = [name for name in (MODEL_FILE, CONFIG_FILE) if not (model_dir / name).is_file()]
    if missing:
        raise InputError(str(model_dir), f"missing {', '.join(missing)}: not a trained model folder")
    _read_json(model_dir / CONFIG_FILE)


def _register_section(params: Mapping[str, Any]) -> dict[str, Any]:
    from deepsc.config import section

    settings = section(params, "register")
    if not settings.get("model_name"):
        raise ConfigError("register.model_name is empty")
    settings["model_name"] = str(settings["model_name"])
    _tolerance(settings.get("tolerance") or {})
    return settings


# ----------------------------------------------------------------------------- CLI


def write_decision(result: RegistrationResult, out_dir: Path) -> Path:
    """``<out_dir>/decision.json``, written atomically."""
    from deepsc.data.volume import atomic_write_bytes

    path = Path(out_dir) / DECISION_FILE
    atomic_write_bytes(path, (json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    return path


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: <outputs>/models/finetune)")
    parser.add_argument("--eval", dest="eval_dir", type=Path, default=None, help="evaluation folder with metrics.json (default: <outputs>/evaluation)")
    parser.add_argument("--out", type=Path, default=None, help="where decision.json goes (default: <outputs>/registry)")
    parser.add_argument("--force", action="store_true", help="make this version champion whatever its metrics (needs --reason)")
    parser.add_argument("--reason", default=None, help="why the promotion is forced (recorded on the version)")


def run_cli(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    from deepsc.config import outputs_dir

    outputs = outputs_dir(params)
    result = register_model(args.model or outputs / "models" / "finetune", args.eval_dir or outputs / "evaluation",
                            params, force=args.force, reason=args.reason)
    path = write_decision(result, args.out or outputs / "registry")
    state = "registered" if result.created else "already registered as"
    print(f"{state} {result.model_name} v{result.version} -> {result.alias}: {result.decision.reason}")
    print(f"decision written to {path}")
    return 0
