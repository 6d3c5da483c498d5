"""The MLflow pyfunc that serves DeepSC diagnoses (``mlflow models serve``).

:func:`deepsc.registry.register_model` logs :class:`DeepSCPyfunc` with the trained model folder
(``model.pt`` + ``config.json``) as the artifact ``model_dir``; ``load_context`` rebuilds the
:class:`~deepsc.inference.Predictor` from it, and ``predict`` runs the SAME core as
``deepsc diagnose`` (:func:`deepsc.diagnose.diagnose_volume`) and returns its summary dict.

Request (JSON body of ``POST /invocations``)::

    {"inputs": {"nifti_b64": "<base64 of a .nii or .nii.gz file>", "return_mask": false}}
    {"inputs": {"path": "/data/scans/case.nii.gz"}}     # only below allowed_roots, see below

``nifti_b64`` is a whole NIfTI file (gzip-compressed or not) in standard base64. ``path`` names a
NIfTI / DICOM folder / MHA / NRRD that the SERVER can read; it is refused unless the server was
given ``allowed_roots`` (constructor) or ``DEEPSC_SERVING_ALLOWED_ROOTS`` (``os.pathsep``-
separated folders), and the path must lie inside one of them. With ``return_mask: true`` the
response also holds ``lesion_mask_nifti_b64``: the uint8 mask as a gzip NIfTI in the geometry of
the input. The signature (:func:`model_signature`) declares the three optional string/boolean
columns, so MLflow hands ``predict`` a one-row DataFrame; a plain dict (direct Python calls,
``dict[str, np.ndarray]`` from a signature-less model) is accepted too.

Response: ``{"predictions": <the diagnosis.json dict>}`` (no files are written). Its
``timing.peak_rss_mb`` is the peak resident memory of this request (``peak_rss_scope``:
``request``; ``process``, the server's whole life, where the system cannot restart the peak).

Errors never leave a traceback in the response and the server keeps serving. MLflow 3.17's
scoring server turns an ``MlflowException`` raised in ``predict`` into its error code's HTTP
status (``INVALID_PARAMETER_VALUE`` -> 400, ``INTERNAL_ERROR`` -> 500, ...) and ANY other
exception into 400 with the Python traceback in the body (``stack_trace``), so ``predict`` raises
only ``MlflowException``:

* malformed requests (wrong or missing fields, not base64, corrupt or non-NIfTI bytes, not a
  CT in HU, no lung found, over ``max_request_mb`` or ``max_voxels``) -> 400 with the reason;
* a failure of the service itself -> 500 with a one-line message (the traceback goes to the
  server log only); ``MemoryError`` -> 503 (retry later / smaller scan).

A malformed JSON body or one without exactly one of ``inputs`` / ``instances`` /
``dataframe_split`` / ``dataframe_records`` is refused by MLflow itself with 400 before
``predict`` runs. Requests run one at a time per server process, base64 decoding included (a
lock bounds memory to one scan; the JSON bodies of waiting requests are held by the server, so
limit the body size at the ingress too); set
``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` above the time of one full-size CPU diagnosis.

This module imports MLflow at its top, unlike the rest of the package: its class must subclass
``mlflow.pyfunc.PythonModel``, and it is imported only where MLflow is loaded anyway (the
registry and the scoring server).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepsc import tracking
from deepsc.registry import MODEL_ARTIFACT  # the artifact key of the model folder

tracking.quiet_mlflow()  # before the first mlflow import: telemetry off, quiet loggers
import mlflow.pyfunc  # noqa: E402

log = logging.getLogger(__name__)

FIELDS = ("nifti_b64", "path", "return_mask")
REQUEST_FILES = ("request.nii.gz", "request.nii")  # where a nifti_b64 payload is written (gzip, plain)
ALLOWED_ROOTS_ENV = "DEEPSC_SERVING_ALLOWED_ROOTS"
DEFAULT_MAX_REQUEST_MB = 512.0
DEFAULT_MAX_VOXELS = 512 * 512 * 1200  # a 1200-slice 512 x 512 scan (~1.2 GB as float32)


def model_signature() -> Any:
    """Input schema of the pyfunc: optional ``nifti_b64`` / ``path`` strings and ``return_mask``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(inputs=Schema([
        ColSpec("string", "nifti_b64", required=False),
        ColSpec("string", "path", required=False),
        ColSpec("boolean", "return_mask", required=False),
    ]))


def request_error(message: str) -> Exception:
    """An MlflowException the scoring server answers with HTTP 400 and this message."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _service_error(message: str, code: str = "INTERNAL_ERROR") -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    return MlflowException(message, error_code=getattr(databricks_pb2, code))


class DeepSCPyfunc(mlflow.pyfunc.PythonModel):
    """DeepSC diagnosis as an MLflow pyfunc (request and response in the module docstring).

    Args:
        max_request_mb: largest accepted decoded NIfTI payload, MB.
        max_voxels: largest accepted scan (voxels, checked from the header before reading).
        allowed_roots: folders whose files ``{"path": ...}`` requests may name (default none:
            path requests are refused; ``DEEPSC_SERVING_ALLOWED_ROOTS`` adds folders at serve time).
        params: settings for the diagnosis (``inference``, ``lungseg``, ``validate``; the
            registry passes those of params.yaml, :data:`deepsc.registry.SERVED_SECTIONS`); None:
            the defaults.
        device: auto | cpu | cuda.
    """

    def __init__(self, max_request_mb: float = DEFAULT_MAX_REQUEST_MB, max_voxels: int = DEFAULT_MAX_VOXELS,
                 allowed_roots: Sequence[str | os.PathLike] = (), params: Mapping[str, Any] | None = None,
                 device: str = "auto") -> None:
        if not (isinstance(max_request_mb, (int, float)) and max_request_mb > 0):
            raise ValueError(f"max_request_mb must be a positive number, got {max_request_mb!r}")
        if not (isinstance(max_voxels, int) and max_voxels > 0):
            raise ValueError(f"max_voxels must be a positive integer, got {max_voxels!r}")
        self.max_request_mb = float(max_request_mb)
        self.max_voxels = max_voxels
        self.allowed_roots = [str(Path(root)) for root in allowed_roots]
        self.params = dict(params or {})
        self.device = device

    # ------------------------------------------------------------------ MLflow hooks
    def load_context(self, context: Any) -> None:
        """Rebuild the Predictor from the ``model_dir`` artifact (once per server process)."""
        from deepsc.diagnose import load_predictor

        folder = (context.artifacts or {}).get(MODEL_ARTIFACT)
        if not folder:
            raise _service_error(f"the logged model has no '{MODEL_ARTIFACT}' artifact (the trained model folder)")
        self.model_dir = Path(folder)
        self.predictor, self.model_info = load_predictor(self.model_dir, self.params, device=self.device)
        self._lock = threading.Lock()

    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> dict[str, Any]:  # noqa: ANN001
        """Diagnose the scan of one request; see the module docstring for input, output, errors.

        ``model_input`` (a one-row DataFrame or a dict) carries no type hint on purpose: MLflow
        derives a schema from a hint and would then bypass the column signature.
        """
        # one request at a time, decoding included: waiting requests hold only their JSON body
        with self._lock, tempfile.TemporaryDirectory(prefix="deepsc-request-") as tmp:
            request = parse_request(model_input, self.max_request_mb)
            return self._diagnose_request(request, Path(tmp))

    def _diagnose_request(self, request: Mapping[str, Any], tmp: Path) -> dict[str, Any]:
        from mlflow.exceptions import MlflowException

        from deepsc.diagnose import reset_peak_rss
        from deepsc.errors import InputError

        try:
            scope = "request" if reset_peak_rss() else "process"  # requests run one at a time
            volume = self._read(request, tmp)
            result = _diagnose(volume, self.predictor, self.params, self.model_info)
            summary = result.summary
            summary["timing"]["peak_rss_scope"] = scope
            if request["nifti"] is not None:  # not the server's temporary file
                summary["input"]["source"] = "request (nifti_b64)"
            if request["return_mask"] and result.lesion_mask is not None:  # while the input file exists
                summary["lesion_mask_nifti_b64"] = mask_to_b64(result.lesion_mask, volume)
        except InputError as exc:
            message = str(exc)
            for name in REQUEST_FILES:  # the server's temporary file means nothing to the caller
                message = message.replace(str(tmp / name), "the nifti_b64 scan")
            raise request_error(message) from None
        except MlflowException:
            raise
        except MemoryError:
            log.exception("out of memory while diagnosing a request")
            raise _service_error("out of memory while diagnosing this scan; retry later or send a smaller scan",
                                 "TEMPORARILY_UNAVAILABLE") from None
        except Exception as exc:  # a bug or a broken server: log it whole, answer briefly
            log.exception("diagnosis failed")
            raise _service_error(f"internal error while diagnosing the scan ({type(exc).__name__}); see the server log") from None
        return summary

    # ------------------------------------------------------------------ input
    def _read(self, request: Mapping[str, Any], tmp: Path) -> Any:
        from deepsc.data.io import read_ct

        if request["nifti"] is not None:
            payload = request["nifti"]
            path = tmp / REQUEST_FILES[0 if payload[:2] == b"\x1f\x8b" else 1]
            path.write_bytes(payload)
            return read_ct(path, "request", max_voxels=self.max_voxels)
        path = self._allowed_path(request["path"])
        return read_ct(path, max_voxels=self.max_voxels)

    def _allowed_path(self, text: str) -> Path:
        roots = self.allowed_roots + [r for r in os.environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep) if r]
        if not roots:
            raise request_error("path requests are disabled on this server; send the scan as nifti_b64")
        try:
            path = Path(text).resolve()
            inside = any(path.is_relative_to(Path(root).resolve()) for root in roots)
            exists = inside and path.exists()
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a symlink loop
            raise request_error(f"path is not a usable file name ({type(exc).__name__}: {exc})") from None
        if not inside:
            raise request_error("path is outside the folders this server may read")
        if not exists:
            raise request_error(f"no such file or folder on the server: {path}")
        return path


def _diagnose(volume: Any, predictor: Any, params: Mapping[str, Any], model_info: Mapping[str, Any]) -> Any:
    from deepsc.diagnose import diagnose_volume

    return diagnose_volume(volume, predictor, params, model_info=model_info, progress=False)


def parse_request(model_input: Any, max_request_mb: float) -> dict[str, Any]:
    """``{"nifti": bytes | None, "path": str | None, "return_mask": bool}`` from a request.

    Accepts a one-row DataFrame (column signature), ``dict[str, np.ndarray]`` or a plain dict.

    Raises:
        MlflowException (400): wrong fields, both or neither of nifti_b64 / path, not base64,
            payload over ``max_request_mb``.
    """
    fields = _fields(model_input)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise request_error(f"unknown field(s) {', '.join(unknown)}; send {{\"inputs\": {{\"nifti_b64\": ...}}}}")
    encoded, path = fields.get("nifti_b64"), fields.get("path")
    if (encoded is None) == (path is None):
        raise request_error("send exactly one of nifti_b64 (base64 of a .nii / .nii.gz file) or path")
    return_mask = fields.get("return_mask", False)
    if not isinstance(return_mask, (bool, np.bool_)):
        raise request_error("return_mask must be true or false")
    if path is not None:
        if not isinstance(path, str) or not path:
            raise request_error("path must be a non-empty string")
        return {"nifti": None, "path": path, "return_mask": bool(return_mask)}
    if not isinstance(encoded, str):
        raise request_error("nifti_b64 must be a base64 string")
    limit = int(max_request_mb * 1024 * 1024)
    if len(encoded) // 4 * 3 > limit:
        raise request_error(f"the scan is too large: {len(encoded) // 4 * 3 / 2**20:.1f} MB decoded, "
                            f"the limit is {max_request_mb:g} MB")
    try:  # line-wrapped base64 (`base64 scan.nii.gz` wraps at 76 columns) is still base64
        payload = base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError):
        raise request_error("nifti_b64 is not valid base64") from None
    if not payload:
        raise request_error("nifti_b64 is empty")
    return {"nifti": payload, "path": None, "return_mask": bool(return_mask)}


def _fields(model_input: Any) -> dict[str, Any]:
    """The request's fields as plain Python values (None / NaN cells dropped)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if len(model_input) != 1:
            raise request_error(f"send one scan per request, got {len(model_input)} rows; "
                                "use {\"inputs\": {\"nifti_b64\": ...}}")
        raw = model_input.iloc[0].to_dict()
    elif isinstance(model_input, Mapping):
        raw = dict(model_input)
    else:
        raise request_error("expected {\"inputs\": {\"nifti_b64\": \"<base64 of a .nii or .nii.gz>\"}}")
    fields = {}
    for key, value in raw.items():
        if isinstance(value, np.ndarray):
            if value.size != 1:
                raise request_error(f"field {key} must be a single value, got an array of shape {value.shape}")
            value = value.reshape(()).item()
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        fields[str(key)] = value
    return fields


def mask_to_b64(mask: np.ndarray, volume: Any) -> str:
    """A uint8 mask as base64 of a gzip NIfTI that overlays the request's scan voxel for voxel
    (:func:`deepsc.diagnose.nifti_like_input`)."""
    from deepsc.diagnose import nifti_like_input

    return base64.b64encode(nifti_like_input(mask, volume, np.uint8)).decode("ascii")
