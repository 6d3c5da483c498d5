"""DeepSCPyfunc: request parsing, errors as 4xx, and the real `mlflow models serve` end to end."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from tests.e2e_helpers import free_port, stop_process

from deepsc import CLASSES
from test_diagnose import synthetic_ct
from test_inference import make_model_dir

MAX_REQUEST_MB = 0.5


def nifti_b64(volume, tmp_path: Path, name: str = "scan.nii.gz") -> str:
    from deepsc.data.volume import save_nifti

    return base64.b64encode(save_nifti(volume, tmp_path / name).read_bytes()).decode("ascii")


def mr_like(volume):
    """Same anatomy, intensities shifted to be all positive (no air at -1000): not CT in HU."""
    return volume.like((volume.array.astype(np.float32) + 2024.0).astype(np.float32))


@pytest.fixture(scope="module")
def pyfunc(tmp_path_factory):
    from deepsc.serving import DeepSCPyfunc

    model_dir = make_model_dir(tmp_path_factory.mktemp("model") / "finetune")
    model = DeepSCPyfunc(max_request_mb=MAX_REQUEST_MB)
    model.load_context(SimpleNamespace(artifacts={"model_dir": str(model_dir)}))
    return model


def _status(exc_info) -> int:
    from mlflow.exceptions import MlflowException

    assert isinstance(exc_info.value, MlflowException)
    return exc_info.value.get_http_status_code()


def test_predict_returns_the_diagnosis_for_dict_and_dataframe_inputs(pyfunc, tmp_path):
    import nibabel as nib

    volume = synthetic_ct().image
    encoded = nifti_b64(volume, tmp_path)
    from_dict = pyfunc.predict(None, {"nifti_b64": np.array(encoded), "return_mask": np.array(True)})
    from_frame = pyfunc.predict(None, pd.DataFrame({"nifti_b64": [encoded]}))
    assert from_dict["classification"] == from_frame["classification"]
    assert from_dict["disclaimer"] == "research use, not for clinical diagnosis"
    assert list(from_dict["classification"]["probabilities"]) == list(CLASSES)
    assert "lesion_mask_nifti_b64" not in from_frame
    assert from_frame["timing"]["peak_rss_scope"] in {"request", "process"}  # not the server's lifetime where Linux allows
    mask_path = tmp_path / "mask.nii.gz"
    mask_path.write_bytes(base64.b64decode(from_dict["lesion_mask_nifti_b64"]))
    mask, scan = nib.load(mask_path), nib.load(tmp_path / "scan.nii.gz")
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
    assert np.asarray(mask.dataobj).sum() * volume.voxel_volume_ml == pytest.approx(from_dict["lesions"]["total_volume_ml"], rel=1e-3)
    json.dumps(from_dict, allow_nan=False)  # strict JSON


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({}, "exactly one of"),
        ({"nifti_b64": "QUJD", "path": "/x"}, "exactly one of"),
        ({"image": "QUJD"}, "unknown field"),
        ({"nifti_b64": "not base64 !!"}, "not valid base64"),
        ({"nifti_b64": base64.b64encode(b"\x1f\x8b\x08 corrupt").decode()}, "the nifti_b64 scan"),
        ({"nifti_b64": "QUJD", "return_mask": "yes"}, "true or false"),
        ({"nifti_b64": "A" * int(MAX_REQUEST_MB * 2**20 * 1.5)}, "too large"),
        ({"path": "/etc/hostname"}, "disabled"),
    ],
)
def test_malformed_requests_are_400_with_a_reason(pyfunc, request_fields, message):
    with pytest.raises(Exception) as exc_info:
        pyfunc.predict(None, request_fields)
    assert _status(exc_info) == 400
    assert message in exc_info.value.message and "Traceback" not in exc_info.value.message
    assert "deepsc-request-" not in exc_info.value.message  # never the server's temporary file


def test_line_wrapped_base64_is_accepted(pyfunc, tmp_path):
    """`base64 scan.nii.gz` wraps at 76 columns: still the same scan."""
    encoded = nifti_b64(synthetic_ct().image, tmp_path)
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76)) + "\n"
    answer = pyfunc.predict(None, {"nifti_b64": wrapped})
    assert answer["classification"] == pyfunc.predict(None, {"nifti_b64": encoded})["classification"]
    assert answer["input"]["source"] == "request (nifti_b64)"


def test_non_ct_volume_is_400(pyfunc, tmp_path):
    with pytest.raises(Exception) as exc_info:
        pyfunc.predict(None, {"nifti_b64": nifti_b64(mr_like(synthetic_ct().image), tmp_path)})
    assert _status(exc_info) == 400 and "no negative values" in exc_info.value.message


def test_path_requests_only_below_allowed_roots(tmp_path, monkeypatch):
    from deepsc.data.volume import save_nifti
    from deepsc.serving import ALLOWED_ROOTS_ENV, DeepSCPyfunc

    model = DeepSCPyfunc()
    model.load_context(SimpleNamespace(artifacts={"model_dir": str(make_model_dir(tmp_path / "m"))}))
    scans = tmp_path / "scans"
    scan = save_nifti(synthetic_ct().image, scans / "a.nii.gz")
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(scans))
    assert model.predict(None, {"path": str(scan)})["case_id"] == "a"
    for outside in (str(tmp_path / "m" / "config.json"), str(scans / ".." / "m" / "model.pt")):
        with pytest.raises(Exception) as exc_info:
            model.predict(None, {"path": outside})
        assert _status(exc_info) == 400 and "outside" in exc_info.value.message
    for unusable in (str(scans / "a\x00b.nii.gz"), str(scans / ("a" * 300))):
        with pytest.raises(Exception) as exc_info:
            model.predict(None, {"path": unusable})
        assert _status(exc_info) == 400 and "not a usable file name" in exc_info.value.message


def test_internal_failures_are_500_without_traceback(pyfunc, tmp_path, monkeypatch):
    from deepsc import serving

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(serving, "_diagnose", broken)
    with pytest.raises(Exception) as exc_info:
        pyfunc.predict(None, {"nifti_b64": nifti_b64(synthetic_ct().image, tmp_path)})
    assert _status(exc_info) == 500 and "RuntimeError" in exc_info.value.message
    assert "stack_trace" not in exc_info.value.serialize_as_json()


def test_out_of_memory_is_503_and_a_model_without_its_folder_is_refused(pyfunc, tmp_path, monkeypatch):
    from deepsc import serving

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(serving, "_diagnose", exhausted)
    with pytest.raises(Exception) as exc_info:
        pyfunc.predict(None, {"nifti_b64": nifti_b64(synthetic_ct().image, tmp_path)})
    assert _status(exc_info) == 503 and "out of memory" in exc_info.value.message
    with pytest.raises(Exception) as exc_info:
        serving.DeepSCPyfunc().load_context(SimpleNamespace(artifacts={}))
    assert _status(exc_info) == 500 and "model_dir" in exc_info.value.message


def test_constructor_rejects_bad_limits():
    from deepsc.serving import DeepSCPyfunc

    for kwargs in ({"max_request_mb": 0}, {"max_voxels": -1}, {"max_voxels": 1.5}):
        with pytest.raises(ValueError):
            DeepSCPyfunc(**kwargs)


# ----------------------------------------------------------------------------- real server


def _post(port: int, body: dict | str, timeout: float = 120.0) -> tuple[int, dict]:
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """A tiny model registered through deepsc.registry (the first version: alias champion).

    MLFLOW_TRACKING_URI is set (and restored afterwards): mlflow.set_tracking_uri exports it, and
    the environment wins over params in deepsc.tracking, so a URI of an earlier test would linger.
    """
    from deepsc.config import apply_overrides, load_params
    from deepsc.registry import register_model
    from deepsc.serving import DeepSCPyfunc

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = apply_overrides(load_params(Path(__file__).resolve().parents[1] / "params.yaml", "default"),
                             {"mlflow.tracking_uri": uri})
    eval_dir = tmp_path / "evaluation"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps({"dsc_mean": 0.5, "accuracy": 0.5}))
    result = register_model(make_model_dir(tmp_path / "finetune"), eval_dir, params,
                            python_model=DeepSCPyfunc(max_request_mb=MAX_REQUEST_MB))
    assert result.alias == "champion"
    return params, uri, result


@pytest.fixture
def served_model(registered, tmp_path):
    """`mlflow models serve -m models:/deepsc-covid@champion` on a free 127.0.0.1 port."""
    _, uri, result = registered
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "300"}
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{result.model_name}@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, f"the server exited: {log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"no /ping answer within 180 s: {log_path.read_text()[-3000:]}")
        yield port, result.sha256
    finally:
        stop_process(server, timeout=20)


@pytest.mark.slow
def test_mlflow_models_serve_answers_good_bad_and_concurrent_requests(served_model, tmp_path):
    port, sha256 = served_model
    volume = synthetic_ct().image
    good = {"inputs": {"nifti_b64": nifti_b64(volume, tmp_path)}}

    status, body = _post(port, good)
    assert status == 200, body
    first = body["predictions"]
    assert first["disclaimer"] == "research use, not for clinical diagnosis"
    assert first["classification"]["decision"] in CLASSES
    assert first["model"]["version"] == f"sha256:{sha256[:12]}"  # the registry's model_sha256 tag

    bad_requests = {
        "wrong envelope": {"data": {"nifti_b64": "QUJD"}},
        "not JSON": "this is not json",
        "unknown field": {"inputs": {"image": "QUJD"}},
        "corrupt base64": {"inputs": {"nifti_b64": "%%% not base64 %%%"}},
        "corrupt bytes": {"inputs": {"nifti_b64": base64.b64encode(b"\x1f\x8bnot a nifti at all").decode()}},
        "not a CT": {"inputs": {"nifti_b64": nifti_b64(mr_like(volume), tmp_path, "mr.nii.gz")}},
        "oversize": {"inputs": {"nifti_b64": base64.b64encode(os.urandom(int(MAX_REQUEST_MB * 2**20) + 4096)).decode()}},
    }
    for name, body in bad_requests.items():
        status, answer = _post(port, body)
        assert 400 <= status < 500, (name, status, answer)
        assert answer.get("message") and "stack_trace" not in answer and "Traceback" not in answer["message"], name
    _, answer = _post(port, bad_requests["not a CT"])
    assert "no negative values" in answer["message"]
    _, answer = _post(port, bad_requests["oversize"])
    assert "too large" in answer["message"]

    results: list[tuple[int, dict]] = []
    threads = [threading.Thread(target=lambda: results.append(_post(port, good))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [status for status, _ in results] == [200] * 4
    assert all(body["predictions"]["classification"] == first["classification"] for _, body in results)

    status, body = _post(port, {"inputs": {"nifti_b64": good["inputs"]["nifti_b64"], "return_mask": True}})
    assert status == 200 and body["predictions"]["lesion_mask_nifti_b64"]


@pytest.mark.slow
def test_diagnose_resolves_a_registry_alias(registered, tmp_path):
    from deepsc.data.volume import save_nifti
    from deepsc.diagnose import diagnose

    params, _, result = registered
    scan = save_nifti(synthetic_ct().image, tmp_path / "scan.nii.gz")
    summary = diagnose(scan, f"models:/{result.model_name}@champion", tmp_path / "out", params, device="cpu", progress=False)
    assert summary["model"]["name"] == result.model_name and summary["model"]["version"] == result.version
    assert (tmp_path / "out" / "lesion_mask.nii.gz").is_file()
