"""Deterministic stratified train/test split and k stratified folds of the train part.

``outputs/split.csv`` (docs/architecture.md): ``case_id, label, subset (train | test),
fold (0..k-1 for train rows, -1 for test)``, rows sorted by ``case_id``.

Patients: the manifest's optional ``patient_id`` column groups the scans of one patient; all of
them go to the same subset and the same fold, so no patient is both trained on and tested on.
A row without a patient id is its own patient. The split is stratified by the patient's label:
when one patient's scans carry different labels (e.g. a normal scan and a later COVID-19 scan),
the majority label counts (a tie goes to the first of covid, cap, normal) and a warning names
the patient; every row keeps its own label in the file.

Determinism: within each class, patients are ordered by the smallest
``sha256(f"{seed}:{case_id}")`` of their scans, which depends on neither the manifest's row
order nor the numpy version. Patients are taken into the test set in that order until it holds
about ``round(n_class * test_fraction)`` scans (a patient that would overshoot the target by
more than it would undershoot it is passed over; at least one patient stays in train; paper:
75 / 25 stratified). The train patients are dealt to folds in the same order, each to the fold
holding the fewest scans of its class (ties: round-robin, continuing from class to class), so
every fold holds each class in proportions that differ by at most one case when patients have
one scan each. Without patient ids (one scan per patient) this is exactly the case-level split,
and the same manifest and settings always give a byte-identical file.
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


def stratified_split(
    case_ids: Sequence[str], labels: Sequence[str], config: SplitConfig, patients: Sequence[str | None] | None = None
) -> Any:
    """Assign every case to train/test and every train case to a fold, patient by patient.

    Args:
        case_ids: unique ids.
        labels: class of each case (one of ``deepsc.CLASSES``).
        config: the split settings.
        patients: patient id of each case; ``""`` or None (or no list at all): the case is its
            own patient. The scans of one patient share subset and fold.

    Returns:
        ``pandas.DataFrame`` with :data:`SPLIT_COLUMNS`, sorted by ``case_id``.
    """
    import pandas as pd

    _check_cases(case_ids, labels, patients)
    groups = _patient_groups(case_ids, labels, patients, config.seed)
    rows = []
    next_fold = 0
    for name in CLASSES:
        members = sorted((g for g in groups if g.label == name), key=lambda g: g.rank)
        n_cases = sum(len(g.cases) for g in members)
        test = _test_groups(members, _n_test(n_cases, config.test_fraction))
        load = [0] * config.folds  # scans of this class per fold
        for group in members:
            if group in test:
                rows += [(case, label, "test", -1) for case, label in group.cases]
                continue
            fold = _emptiest_fold(load, next_fold)
            load[fold] += len(group.cases)
            next_fold = (fold + 1) % config.folds
            rows += [(case, label, "train", fold) for case, label in group.cases]
        n_test = sum(len(g.cases) for g in test)
        _warn_small_class(name, n_cases, n_test, len(members) - len(test), config)
    frame = pd.DataFrame(rows, columns=list(SPLIT_COLUMNS))
    return frame.sort_values("case_id", kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class _Patient:
    """The scans of one patient: ``cases`` are (case_id, label) pairs, ``label`` the stratum."""

    cases: tuple[tuple[str, str], ...]
    label: str
    rank: str


def _check_cases(case_ids: Sequence[str], labels: Sequence[str], patients: Sequence[str | None] | None) -> None:
    if len(case_ids) != len(labels):
        raise ValueError(f"{len(case_ids)} case ids but {len(labels)} labels")
    if patients is not None and len(patients) != len(case_ids):
        raise ValueError(f"{len(case_ids)} case ids but {len(patients)} patient ids")
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("case ids must be unique")
    unknown = sorted(set(labels) - set(CLASSES))
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}")


def _patient_groups(case_ids: Sequence[str], labels: Sequence[str], patients: Sequence[str | None] | None, seed: int) -> list[_Patient]:
    """One :class:`_Patient` per patient id, and one per case without a patient id."""
    members: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for index, (case, label) in enumerate(zip(case_ids, labels)):
        patient = str(patients[index] or "").strip() if patients is not None else ""
        key = ("patient", patient) if patient else ("case", case)
        members.setdefault(key, []).append((case, label))
    return [_patient(key, sorted(cases), seed) for key, cases in members.items()]


def _patient(key: tuple[str, str], cases: list[tuple[str, str]], seed: int) -> _Patient:
    votes = [sum(label == name for _, label in cases) for name in CLASSES]
    label = CLASSES[votes.index(max(votes))]  # majority; a tie goes to the first class
    if max(votes) < len(cases):
        listing = ", ".join(f"{case} ({name})" for case, name in cases)
        logger.warning("patient %s has scans of different labels: %s; split as %s", key[1], listing, label)
    return _Patient(tuple(cases), label, min(_rank(case, seed) for case, _ in cases))


def _test_groups(members: list[_Patient], target: int) -> set[_Patient]:
    """The patients held out: in rank order, while the test scans stay near ``target``;
    a patient that would overshoot more than it would undershoot is passed over; one stays in train."""
    chosen: set[_Patient] = set()
    count = 0
    for group in members:
        size = len(group.cases)
        if count < target and count + size - target <= target - count and len(chosen) < len(members) - 1:
            chosen.add(group)
            count += size
    return chosen


def _emptiest_fold(load: list[int], start: int) -> int:
    """The fold with the fewest scans; ties go to the first from ``start`` on (round-robin)."""
    order = [(start + offset) % len(load) for offset in range(len(load))]
    return min(order, key=lambda fold: load[fold])


def make_split(manifest: str | os.PathLike, out_path: str | os.PathLike, params: Mapping[str, Any]) -> Any:
    """Split the cohort of `manifest` by ``params["split"]`` and write `out_path` atomically.

    Only ``case_id``, ``label`` and (when present) ``patient_id`` are read from the manifest (its
    files need not exist here).
    Returns the split frame (:data:`SPLIT_COLUMNS`).
    """
    from deepsc.data.manifest import PATIENT_COLUMN, load_manifest
    from deepsc.data.volume import atomic_write_bytes

    config = SplitConfig.from_params(params)
    cohort = load_manifest(manifest, check_files=False)
    patients = list(cohort[PATIENT_COLUMN]) if PATIENT_COLUMN in cohort.columns else None
    frame = stratified_split(list(cohort["case_id"]), list(cohort["label"]), config, patients)
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


def _warn_small_class(name: str, n_cases: int, n_test: int, n_train_patients: int, config: SplitConfig) -> None:
    if n_cases and config.test_fraction > 0 and n_test == 0:
        logger.warning("class %s has %d case(s): none held out for testing", name, n_cases)
    if 0 < n_train_patients < config.folds:
        logger.warning("class %s has %d train patient(s), fewer than %d folds: some folds lack it", name, n_train_patients, config.folds)


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
