"""GitHub Actions workflows: CI on pull requests, retraining when data.dvc or params.yaml change.

The workflows cannot run here; these tests pin what they do: their triggers, the commands their
steps call and in which order, and that secrets only reach the steps that need them.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"


def _load(name: str) -> dict:
    workflow = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the bare key `on` as the boolean True.
    workflow["on"] = workflow.pop(True, workflow.get("on"))
    return workflow


def _steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def _index(steps: list[dict], pattern: str) -> int:
    """Index of the first step whose `run` script or `uses` action matches `pattern`."""
    for i, step in enumerate(steps):
        if re.search(pattern, step.get("run", "") + step.get("uses", "")):
            return i
    raise AssertionError(f"no step matches {pattern!r}")


def _commands(script: str) -> list[list[str]]:
    """Shell commands of a `run` script as token lists (continuations joined, heredocs dropped)."""
    script = re.sub(r"<<'(\w+)'\n.*?\n\s*\1\n", "\n", script, flags=re.S)
    script = script.replace("\\\n", " ")
    commands = []
    for line in script.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line.split(" | ")[0]))
    return commands


@pytest.fixture(scope="module")
def retrain() -> dict:
    return _load("retrain.yml")


@pytest.fixture(scope="module")
def ci() -> dict:
    return _load("ci.yml")


def test_workflows_are_valid_yaml_with_jobs() -> None:
    names = sorted(path.name for path in WORKFLOWS.glob("*.y*ml"))
    assert names == ["ci.yml", "retrain.yml"]
    for name in names:
        workflow = _load(name)
        assert workflow["on"] and workflow["jobs"], name
        for job in workflow["jobs"].values():
            assert job["runs-on"] and job["steps"] and job["timeout-minutes"] > 0


def test_ci_runs_the_ci_script_on_pull_requests(ci) -> None:
    assert "pull_request" in ci["on"]
    steps = _steps(ci, "test")
    assert steps[_index(steps, r"actions/setup-python")]["with"]["python-version"] == "3.11"
    assert _index(steps, r"actions/checkout") < _index(steps, r"^bash \.ci/run$")
    assert ci["permissions"] == {"contents": "read"}
    assert (REPO / ".ci" / "run").is_file()


def test_retrain_triggers_on_data_and_params_changes_on_main(retrain) -> None:
    push = retrain["on"]["push"]
    assert push["branches"] == ["main"]
    assert sorted(push["paths"]) == ["data.dvc", "params.yaml"]
    assert "workflow_dispatch" in retrain["on"]
    assert "pull_request" not in retrain["on"]  # never train (or see secrets) for unmerged code
    assert retrain["concurrency"]["cancel-in-progress"] is False


def test_retrain_steps_in_order(retrain) -> None:
    steps = _steps(retrain, "retrain")
    checkout = _index(steps, r"actions/checkout")
    assert steps[checkout]["with"]["fetch-depth"] == 0  # the diff reads the previous revision
    python = _index(steps, r"actions/setup-python")
    assert steps[python]["with"]["python-version"] == "3.11"
    install = _index(steps, r"(^|\n)make venv\b")
    pull = _index(steps, r"\.venv/bin/dvc pull\b")
    submit = _index(steps, r"\.venv/bin/deepsc pipeline submit\b")
    wait = _index(steps, r"wait_for_run_completion")
    diff = _index(steps, r"\.venv/bin/dvc metrics diff\b")
    comment = _index(steps, r"actions/github-script")
    assert checkout < python < install < pull < submit < wait < diff < comment


def test_submit_uses_the_pipeline_command_for_this_revision(retrain) -> None:
    steps = _steps(retrain, "retrain")
    step = steps[_index(steps, r"deepsc pipeline submit")]
    (command,) = [c for c in _commands(step["run"]) if c[:3] == [".venv/bin/deepsc", "pipeline", "submit"]]
    options = dict(zip(command[3::2], command[4::2]))
    assert options["--host"] == "$KFP_HOST"
    assert options["--data-version"] == "$GITHUB_SHA"
    assert "--repo-url" in options  # the cluster clones the repository, not this runner's path
    assert "run_id" in step["run"] and step["id"] == "submit"


def test_dvc_pull_gets_s3_credentials_from_secrets_only_there(retrain) -> None:
    steps = _steps(retrain, "retrain")
    pull = steps[_index(steps, r"\.venv/bin/dvc pull\b")]
    assert pull["env"]["AWS_ACCESS_KEY_ID"] == "${{ secrets.AWS_ACCESS_KEY_ID }}"
    assert pull["env"]["AWS_SECRET_ACCESS_KEY"] == "${{ secrets.AWS_SECRET_ACCESS_KEY }}"
    others = [step for step in steps if step is not pull]
    assert not [step for step in others if "secrets." in yaml.safe_dump(step)]
    assert "secrets." not in yaml.safe_dump(retrain.get("env", {}))


def test_metrics_diff_is_posted_as_summary_and_comment(retrain) -> None:
    steps = _steps(retrain, "retrain")
    diff = steps[_index(steps, r"\.venv/bin/dvc metrics diff\b")]
    (command,) = [c for c in _commands(diff["run"]) if c[:3] == [".venv/bin/dvc", "metrics", "diff"]]
    assert command[3] == "$base" and "--md" in command
    assert "github.event.before" in diff["env"]["BEFORE"] and "HEAD~1" in diff["run"]
    assert "GITHUB_STEP_SUMMARY" in diff["run"]
    script = steps[_index(steps, r"actions/github-script")]["with"]["script"]
    assert "listPullRequestsAssociatedWithCommit" in script
    assert "issues.createComment" in script and "createCommitComment" in script
    assert retrain["permissions"]["pull-requests"] == "write"
    assert retrain["permissions"]["contents"] == "write"


def test_metrics_land_where_dvc_yaml_declares_them(retrain) -> None:
    """The fetched metrics file is one that `dvc metrics diff` reads (a metrics entry of dvc.yaml)."""
    dvc_yaml = REPO / "dvc.yaml"
    if not dvc_yaml.is_file():
        pytest.skip("no dvc.yaml")
    declared = {
        path
        for stage in yaml.safe_load(dvc_yaml.read_text())["stages"].values()
        for entry in stage.get("metrics", [])
        for path in ([entry] if isinstance(entry, str) else entry)
    }
    steps = _steps(retrain, "retrain")
    fetch = steps[_index(steps, r"download_artifacts")]["run"]
    target = re.search(r'target = Path\("([^"]+)"\)', fetch).group(1)
    assert target in declared
