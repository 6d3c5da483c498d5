"""DVC with an S3 remote (dvc-s3 / boto3) against a local moto S3 server.

The round trip the team relies on: `dvc add data`, `dvc push` to `s3://bucket/dvc` (endpoint and
credentials configured with `dvc remote modify --local`, so they never reach git), lose the cache
and the working copy, `dvc pull`, and get byte-identical files and a clean `dvc status`.
Everything stays on 127.0.0.1 with fake credentials.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e_helpers import stop_process

BIN = Path(sys.executable).parent
MOTO_SERVER = BIN / "moto_server"
DVC = BIN / "dvc"
BUCKET = "deepsc-dvc-test"
FAKE_KEY_ID = "testing-key-id"
FAKE_SECRET = "testing-secret-key"

pytestmark = pytest.mark.skipif(
    not (MOTO_SERVER.exists() and DVC.exists() and shutil.which("git")),
    reason="needs moto_server and dvc in the virtualenv, and git",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_answering(url: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is up
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"moto_server did not answer at {url} within {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server on a free 127.0.0.1 port with an empty bucket; stopped at module end."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    process = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **_fake_aws_env()},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_answering(endpoint, process)
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=FAKE_KEY_ID,
            aws_secret_access_key=FAKE_SECRET,
        )
        s3.create_bucket(Bucket=BUCKET)
        yield endpoint, s3
    finally:
        stop_process(process, timeout=10)
        log.close()


def _fake_aws_env() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never probe 169.254.169.254 for credentials
    }


def _isolated_env(home: Path) -> dict[str, str]:
    """No AWS profile, DVC global/system config or git identity of the developer leaks in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "DVC_", "GIT_"))
    }
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        DVC_NO_ANALYTICS="1",
        DVC_GLOBAL_CONFIG_DIR=str(home / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(home / "dvc-system"),
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
        AWS_CONFIG_FILE=str(home / "no-aws-config"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def _write_cohort(root: Path) -> None:
    """A few small NIfTI-1 files (348-byte header + int16 voxels, gzipped) and a manifest."""
    import numpy as np

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["case_id,label,image_path,mask_path,lung_path,source"]
    for index, label in enumerate(("covid", "cap", "normal")):
        case = f"case{index:03d}"
        image = rng.integers(-1024, 400, size=(8, 16, 16), dtype=np.int16)
        mask = (image > 200).astype(np.uint8)
        (root / "images" / f"{case}.nii.gz").write_bytes(gzip.compress(_nifti_bytes(image), mtime=0))
        (root / "masks" / f"{case}.nii.gz").write_bytes(gzip.compress(_nifti_bytes(mask), mtime=0))
        rows.append(f"{case},{label},images/{case}.nii.gz,masks/{case}.nii.gz,,test")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")


def _nifti_bytes(array) -> bytes:
    import nibabel as nib
    import numpy as np

    image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine=np.diag([0.8, 0.8, 2.5, 1.0]))
    return image.to_bytes()


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.slow  # about 8 s on an idle core, past 20 s on a loaded machine (a dozen dvc processes)
def test_push_wipe_pull_round_trip(s3_endpoint, tmp_path: Path) -> None:
    endpoint, s3 = s3_endpoint
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _isolated_env(tmp_path / "home")
    (tmp_path / "home").mkdir()
    dvc = str(DVC)

    _run(["git", "init", "-q"], repo, env)
    _run([dvc, "init", "-q"], repo, env)
    _run([dvc, "config", "core.analytics", "false"], repo, env)
    _write_cohort(repo / "data")
    before = _digests(repo / "data")
    _run([dvc, "add", "-q", "data"], repo, env)

    # The shared part of the remote goes to .dvc/config (committed); endpoint and keys to
    # .dvc/config.local, which DVC keeps out of git.
    _run([dvc, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc"], repo, env)
    _run([dvc, "remote", "modify", "--local", "storage", "endpointurl", endpoint], repo, env)
    _run([dvc, "remote", "modify", "--local", "storage", "access_key_id", FAKE_KEY_ID], repo, env)
    _run([dvc, "remote", "modify", "--local", "storage", "secret_access_key", FAKE_SECRET], repo, env)
    committed_config = (repo / ".dvc" / "config").read_text()
    assert FAKE_SECRET not in committed_config and endpoint not in committed_config
    assert "config.local" in (repo / ".dvc" / ".gitignore").read_text()
    assert _run(["git", "check-ignore", ".dvc/config.local", "data"], repo, env).split() == [
        ".dvc/config.local",
        "data",
    ]

    _run([dvc, "push", "-q"], repo, env)
    pushed = s3.list_objects_v2(Bucket=BUCKET, Prefix="dvc/").get("KeyCount", 0)
    assert pushed >= len(before) + 1  # every file plus the directory listing object

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    _run([dvc, "pull", "-q"], repo, env)

    assert _digests(repo / "data") == before
    # `--json` prints {} when nothing differs: workspace vs cache, and cache vs remote.
    assert json.loads(_run([dvc, "status", "--json"], repo, env)) == {}
    assert json.loads(_run([dvc, "status", "--cloud", "--json"], repo, env)) == {}



def test_endpoint_from_environment(s3_endpoint, tmp_path: Path) -> None:
    """With only `url` in .dvc/config, AWS_ENDPOINT_URL_S3 (read by botocore) picks the endpoint:
    how a Kubeflow step or a CI runner reaches MinIO from a fresh clone without config.local."""
    endpoint, s3 = s3_endpoint
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "home").mkdir()
    env = _isolated_env(tmp_path / "home") | _fake_aws_env()
    dvc = str(DVC)
    _run(["git", "init", "-q"], repo, env)
    _run([dvc, "init", "-q"], repo, env)
    (repo / "data").mkdir()
    (repo / "data" / "notes.txt").write_text("endpoint from the environment\n")
    _run([dvc, "add", "-q", "data"], repo, env)
    _run([dvc, "remote", "add", "-d", "storage", f"s3://{BUCKET}/env"], repo, env)
    assert not (repo / ".dvc" / "config.local").exists()

    _run([dvc, "push", "-q"], repo, env | {"AWS_ENDPOINT_URL_S3": endpoint})
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="env/").get("KeyCount", 0) == 2  # file + .dir listing
