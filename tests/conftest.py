"""Shared fixtures. Tests are fast by default; end-to-end ones carry @pytest.mark.slow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_CT_DIR = REPO_ROOT.parent / "shared" / "real-ct" / "covid-ct-md" / "P002"

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture
def real_ct_dir() -> Path:
    """The real COVID-CT-MD scan P002 (DICOM, JPEG-lossless); skips when ../shared is absent."""
    if not REAL_CT_DIR.is_dir():
        pytest.skip("../shared/real-ct is not present")
    return REAL_CT_DIR


@pytest.fixture
def params() -> dict:
    from deepsc.config import load_params

    return load_params(REPO_ROOT / "params.yaml")
