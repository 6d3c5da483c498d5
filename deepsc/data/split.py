"""Deterministic stratified train/test split and k stratified folds of the train part.

``outputs/split.csv`` (docs/architecture.md): ``case_id, label, subset (train | test),
fold (0..k-1 for train rows, -1 for test)``, rows sorted by ``case_id``.

Determinism: within each class, cases are ordered by ``sha256(f"{seed}:{case_id}")``, which
depends on neither the manifest's row order nor the numpy version; the first
``round(n_class * test_fraction)`` cases of each class are the test set (paper: 75 / 25
stratified). The train cases are dealt to folds round-robin, class after class, so every fold
holds each class in proportions that differ by at most one case. The same manifest and
settings therefore always give a byte-identical file.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from deepsc import CLASSES
from deepsc.errors import ConfigError

logger = logging.getLogger(__name__)

SPLIT_COLUMNS = ("case_id", "label", "subset", "fold")


@dataclass(frozen=True)
class SplitConfig:
    """The ``split`` section of params.yaml.

    Args:
        test_fraction: share of each class held out for testing, in [0, 1).
        folds: number k >= 2 of cross-validation folds on the train part.
        seed: integer that fixes the order of cases.
    """

    test_fraction: float
    folds: int
    seed: int

    def __post_init__(self) -> None:
        if isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, (int, float)) or not 0 <= self.test_fraction < 1:
            raise ConfigError(f"split.test_fraction must be a number in [0, 1), got {self.test_fraction!r}")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise ConfigError(f"split.folds must be an integer >= 2, got {self.folds!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"split.seed must be an integer, got {self.seed!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "SplitConfig":
        from deepsc.config import section

        values = section(params, "split")
        unknown = sorted(set(values) - {"test_fraction", "folds", "seed"})
        missing = sorted({"test_fraction", "folds", "seed"} - set(values))
        if unknown or missing:
            raise ConfigError(f"split section: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}")
        return cls(values["test_fraction"], values["folds"], values["seed"])


def stratified_split(case_ids: Sequence[str], labels: Sequence[str], config: SplitConfig) -> Any:
    """Assign every case to train/test and every train case to a fold.

    Args:
        case_ids: unique ids.
        labels: class of each case (one of ``deepsc.CLASSES``).

    Returns:
        ``pandas.DataFrame`` with :data:`SPLIT_COLUMNS`, sorted by ``case_id``.
    """
    import pandas as pd

    if len(case_ids) != len(labels):
        raise ValueError(f"{len(case_ids)} case ids but {len(labels)} labels")
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("case ids must be unique")
    unknown = sorted(set(labels) - set(CLASSES))
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}")
    by_class = {name: sorted((c for c, l in zip(case_ids, labels) if l == name), key=lambda c: _rank(c, config.seed)) for name in CLASSES}
    rows = []
    next_fold = 0
    for name, cases in by_class.items():
        n_test = _n_test(len(cases), config.test_fraction)
        rows += [(case, name, "test", -1) for case in cases[:n_test]]
        for case in cases[n_test:]:
            rows.append((case, name, "train", next_fold))
            next_fold = (next_fold + 1) % config.folds
        _warn_small_class(name, len(cases), n_test, config)
    frame = pd.DataFrame(rows, columns=list(SPLIT_COLUMNS))
    return frame.sort_values("case_id", kind="stable").reset_index(drop=True)


def make_split(manifest: str | os.PathLike, out_path: str | os.PathLike, params: Mapping[str, Any]) -> Any:
    """Split the cohort of `manifest` by ``params["split"]`` and write `out_path` atomically.

    Only ``case_id`` and ``label`` are read from the manifest (its files need not exist here).
    Returns the split frame (:data:`SPLIT_COLUMNS`).
    """
    from deepsc.data.manifest import load_manifest
    from deepsc.data.volume import atomic_write_bytes

    config = SplitConfig.from_params(params)
    cohort = load_manifest(manifest, check_files=False)
    frame = stratified_split(list(cohort["case_id"]), list(cohort["label"]), config)
    atomic_write_bytes(Path(out_path), frame.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    counts = frame.groupby(["subset", "label"]).size()
    logger.info(
        "wrote %s: train %d, test %d (%s)",
        out_path,
        int((frame["subset"] == "train").sum()),
        int((frame["subset"] == "test").sum()),
        ", ".join(f"{subset}/{label} {n}" for (subset, label), n in counts.items()),
    )
    return frame


def _rank(case_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{case_id}".encode("utf-8")).hexdigest()


def _n_test(n_cases: int, test_fraction: float) -> int:
    """round(n * fraction) (halves up), keeping at least one train case per class."""
    return max(0, min(math.floor(n_cases * test_fraction + 0.5), n_cases - 1))


def _warn_small_class(name: str, n_cases: int, n_test: int, config: SplitConfig) -> None:
    if n_cases and config.test_fraction > 0 and n_test == 0:
        logger.warning("class %s has %d case(s): none held out for testing", name, n_cases)
    if 0 < n_cases - n_test < config.folds:
        logger.warning("class %s has %d train case(s), fewer than %d folds: some folds lack it", name, n_cases - n_test, config.folds)


# --------------------------------------------------------------------------- CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, default=None, help="cohort manifest (default: params paths.manifest)")
    parser.add_argument("--out", type=Path, default=None, help="split CSV to write (default: <outputs>/split.csv)")


def run_cli(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    from deepsc.config import outputs_dir

    manifest = args.manifest or Path(params.get("paths", {}).get("manifest", "data/manifest.csv"))
    out = args.out or outputs_dir(params) / "split.csv"
    frame = make_split(manifest, out, params)
    print(f"wrote {out}: {int((frame['subset'] == 'train').sum())} train, {int((frame['subset'] == 'test').sum())} test")
    return 0
