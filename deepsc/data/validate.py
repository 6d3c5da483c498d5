"""The validation gate before anything trains: great-expectations suites over the cohort.

Three tables are validated, each by its own great-expectations suite (ephemeral context, pandas
data source, one dataframe asset + batch definition, ValidationDefinition, Checkpoint):

* ``manifest`` — the manifest as parsed (one row per line, ``line`` = manifest line number);
* ``classes`` — cases per class;
* ``volumes`` — one row of measurements per case (:mod:`deepsc.data.volume_checks`), also
  written as ``checks.csv``.

Every failing expectation is turned into findings (case, check, observed value) from GE's
``unexpected_index_list``. Checks are *blocking* (GE severity ``critical``: the gate fails) or
*warnings* (GE severity ``warning``: reported, the gate passes):

============================  ========  ==========================================================
check                         level     expectation
============================  ========  ==========================================================
required_column               blocking  case_id, label, image_path exist
optional_column               warning   mask_path, lung_path, source exist
has_cases                     blocking  the manifest has at least one row
case_id_present / _unique     blocking  non-empty, unique case ids
case_id_unique_ignoring_case  blocking  no two distinct ids equal ignoring letter case (``Case_01``,
                                        ``case_01``: one folder on macOS / Windows file systems)
case_id_format                blocking  ``[A-Za-z0-9._-]+`` (ids become folder names)
label_present / _known        blocking  label in covid | cap | normal (any letter case, as load_manifest)
image_path_present            blocking  every row names an image
image_exists                  blocking  the image file exists
image_unique                  blocking  no two rows name the same image file (links followed; a
                                        DICOM file counts as its series folder, as read_ct reads it)
mask_exists / lung_exists     blocking  a named lesion / lung mask file exists
mask_available                warning   covid and cap cases have a lesion mask
class_present                 blocking  every class has >= 1 case
class_size                    warning   every class has >= ``min_cases_per_class`` cases
readable                      blocking  the image reads (``read_ct``'s reason is the observed value;
                                        it refuses truncated files, NaN / inf voxels, bad headers)
is_3d                         blocking  3 dimensions
spacing_min_mm / _max_mm      blocking  every voxel spacing within ``spacing_mm``
slice_count                   blocking  ``min_slices`` .. ``max_slices``
intensity_is_hu               blocking  not 0-255 windowed, not MR-like (no negative values)
hu_air                        blocking  1st percentile < ``air_p01_max_hu`` (air present)
hu_min / hu_max               blocking  within ``hu_min_floor`` .. ``hu_max_ceiling``
mask_readable                 blocking  the lesion mask reads
lung_available                blocking  the lung mask reads (lung_path) or segments (lungseg)
mask_shape / lung_shape       blocking  the mask's (Z, Y, X) shape equals the image's
mask_affine / lung_affine     blocking  the mask's voxel grid is within ``grid_tolerance_voxels`` of
                                        the image's (largest corner distance / smallest spacing)
mask_binary                   blocking  lesion mask values in {0, 1}
lesion_inside_lung            blocking  fraction of lesion voxels outside the ``lung_path`` mask
                                        <= ``lesion_outside_lung_max``
lesion_inside_segmented_lung  warning   the same against the automatic lung mask (lungseg), which
                                        tends to leave out dense lesions at the pleura
normal_without_lesions        warning   normal cases with a mask have no lesion voxels
============================  ========  ==========================================================

Checks on values that could not be measured (unreadable image, no mask) see a missing value,
which great-expectations skips, so each problem is reported once, by the check that names it.
The lung comes from ``lung_path`` when given, else (only for cases with lesions) from
``deepsc.data.lungseg.segment_lungs_from_params``; without either the check is skipped with a note.
Paths are resolved by :func:`deepsc.data.manifest.resolve_path`, as every stage resolves them, so
the gate checks the very files the pipeline reads. The data are only read, never written.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from deepsc import CLASSES
from deepsc.config import outputs_dir, section
from deepsc.data.manifest import (
    CASE_ID_REGEX, case_id_key, manifest_folder, normalise_label, resolve_path, same_file_key,
)
from deepsc.data.volume import atomic_write_bytes
from deepsc.data.volume_checks import VOLUME_COLUMNS, CaseFiles, LungSegmenter, measure_case
from deepsc.errors import ConfigError, InputError, ValidationFailed

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("case_id", "label", "image_path")
OPTIONAL_COLUMNS = ("mask_path", "lung_path", "source")
CASE_ID_PATTERN = f"^{CASE_ID_REGEX}$"
LESION_CLASSES = ("covid", "cap")
COHORT = "(cohort)"
"""`case_id` of findings about the cohort as a whole (a missing column, a missing class)."""

COUNT_COLUMNS = ("ndim", "n_slices", "mask_nonbinary_voxels", "lesion_voxels")  # nullable integers
FLOAT_COLUMNS = (
    "spacing_min_mm", "spacing_max_mm", "hu_min", "hu_p01", "hu_p99", "hu_max", "mask_grid_offset_mm",
    "mask_grid_offset_voxels", "lesion_volume_ml", "lung_grid_offset_mm", "lung_grid_offset_voxels",
    "lesion_outside_lung_fraction", "seconds",
)


# --------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ValidateConfig:
    """The ``validate:`` section of params.yaml (HU, mm, fractions); rejects inconsistent values."""

    min_slices: int = 16
    max_slices: int = 2000
    max_voxels: int = 400_000_000
    spacing_mm: tuple[float, float] = (0.1, 12.0)
    hu_min_floor: float = -3100.0  # below GE's -3024 / -3072 HU outside-field-of-view padding (dcm2niix keeps it)
    hu_max_ceiling: float = 32767.0
    air_p01_max_hu: float = -900.0
    lesion_outside_lung_max: float = 0.05
    grid_tolerance_voxels: float = 0.1
    min_cases_per_class: int = 5

    def __post_init__(self) -> None:
        low, high = self.spacing_mm
        problems = [
            (1 <= self.min_slices <= self.max_slices, "need 1 <= min_slices <= max_slices"),
            (self.max_voxels > 0, "max_voxels must be positive"),
            (0 < low < high, "spacing_mm must be [low, high] with 0 < low < high"),
            (self.hu_min_floor < self.air_p01_max_hu < self.hu_max_ceiling,
             "need hu_min_floor < air_p01_max_hu < hu_max_ceiling"),
            (0.0 <= self.lesion_outside_lung_max <= 1.0, "lesion_outside_lung_max must be a fraction in [0, 1]"),
            (self.grid_tolerance_voxels >= 0, "grid_tolerance_voxels must be >= 0"),
            (self.min_cases_per_class >= 1, "min_cases_per_class must be >= 1"),
        ]
        for ok, message in problems:
            if not ok:
                raise ConfigError(f"validate: {message}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ValidateConfig":
        values = section(params, "validate")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"validate: unknown setting(s) {', '.join(unknown)}")
        try:
            if "spacing_mm" in values:
                values["spacing_mm"] = tuple(float(v) for v in values["spacing_mm"])
                if len(values["spacing_mm"]) != 2:
                    raise ValueError("spacing_mm needs two values")
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"validate: {exc}") from None


# ------------------------------------------------------------------------------------------ checks
@dataclass(frozen=True)
class Check:
    """One expectation with its place in the report.

    Args:
        name: the check's name in the report.
        blocking: True -> GE severity critical (fails the gate); False -> warning.
        expectation: the great-expectations Expectation.
        detail: a column of the same table shown next to the observed value (a path, the values).
    """

    name: str
    blocking: bool
    expectation: Any
    detail: str | None = None

    @property
    def level(self) -> str:
        return "blocking" if self.blocking else "warning"


def _check(name: str, blocking: bool, expectation_cls: Any, detail: str | None = None, **kwargs: Any) -> Check:
    severity = "critical" if blocking else "warning"
    return Check(name, blocking, expectation_cls(meta={"check": name}, severity=severity, **kwargs), detail)


def column_checks() -> list[Check]:
    import great_expectations.expectations as gxe

    return [_check("required_column", True, gxe.ExpectColumnToExist, column=c) for c in REQUIRED_COLUMNS] + [
        _check("optional_column", False, gxe.ExpectColumnToExist, column=c) for c in OPTIONAL_COLUMNS
    ]


def manifest_checks() -> list[Check]:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    return [
        _check("has_cases", True, gxe.ExpectTableRowCountToBeBetween, min_value=1),
        _check("case_id_present", True, gxe.ExpectColumnValuesToNotBeNull, column="case_id"),
        _check("case_id_unique", True, gxe.ExpectColumnValuesToBeUnique, column="case_id"),
        _check("case_id_unique_ignoring_case", True, gxe.ExpectColumnValuesToBeUnique, column="case_id_folded"),
        _check("case_id_format", True, gxe.ExpectColumnValuesToMatchRegex, column="case_id", regex=CASE_ID_PATTERN),
        _check("label_present", True, gxe.ExpectColumnValuesToNotBeNull, column="label"),
        _check("label_known", True, gxe.ExpectColumnValuesToBeInSet, column="label", value_set=list(CLASSES)),
        _check("image_path_present", True, gxe.ExpectColumnValuesToNotBeNull, column="image_path"),
        _check("image_exists", True, gxe.ExpectColumnValuesToBeInSet, "image_path", column="image_exists", value_set=[True]),
        _check("image_unique", True, gxe.ExpectColumnValuesToBeUnique, "image_path", column="image_file"),
        _check("mask_exists", True, gxe.ExpectColumnValuesToBeInSet, "mask_path", column="mask_exists", value_set=[True]),
        _check("lung_exists", True, gxe.ExpectColumnValuesToBeInSet, "lung_path", column="lung_exists", value_set=[True]),
        _check("mask_available", False, gxe.ExpectColumnValuesToBeInSet, column="has_mask", value_set=[True],
               row_condition=Column("label").is_in(LESION_CLASSES)),
    ]


def class_checks(cfg: ValidateConfig) -> list[Check]:
    import great_expectations.expectations as gxe

    return [
        _check("class_present", True, gxe.ExpectColumnValuesToBeBetween, column="n_cases", min_value=1),
        _check("class_size", False, gxe.ExpectColumnValuesToBeBetween, column="n_cases", min_value=cfg.min_cases_per_class),
    ]


def volume_checks(cfg: ValidateConfig) -> list[Check]:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    low, high = cfg.spacing_mm
    between = gxe.ExpectColumnValuesToBeBetween
    same_shape = gxe.ExpectColumnPairValuesToBeEqual
    return [
        _check("readable", True, gxe.ExpectColumnValuesToBeNull, column="read_error"),
        _check("is_3d", True, gxe.ExpectColumnValuesToBeInSet, "shape", column="ndim", value_set=[3]),
        _check("spacing_min_mm", True, between, "spacing_mm", column="spacing_min_mm", min_value=low),
        _check("spacing_max_mm", True, between, "spacing_mm", column="spacing_max_mm", max_value=high),
        _check("slice_count", True, between, "shape", column="n_slices", min_value=cfg.min_slices, max_value=cfg.max_slices),
        _check("intensity_is_hu", True, gxe.ExpectColumnValuesToBeInSet, "hu_max", column="intensity_kind", value_set=["hu"]),
        _check("hu_air", True, between, column="hu_p01", max_value=cfg.air_p01_max_hu, strict_max=True),
        _check("hu_min", True, between, column="hu_min", min_value=cfg.hu_min_floor),
        _check("hu_max", True, between, column="hu_max", max_value=cfg.hu_max_ceiling),
        _check("mask_readable", True, gxe.ExpectColumnValuesToBeNull, column="mask_error"),
        _check("mask_shape", True, same_shape, column_A="mask_shape", column_B="shape", ignore_row_if="either_value_is_missing"),
        _check("mask_affine", True, between, "mask_grid_offset_mm", column="mask_grid_offset_voxels",
               min_value=0, max_value=cfg.grid_tolerance_voxels),
        _check("mask_binary", True, between, "mask_nonbinary_values", column="mask_nonbinary_voxels", min_value=0, max_value=0),
        _check("lung_available", True, gxe.ExpectColumnValuesToBeNull, "lung_source", column="lung_error"),
        _check("lung_shape", True, same_shape, column_A="lung_shape", column_B="shape", ignore_row_if="either_value_is_missing"),
        _check("lung_affine", True, between, "lung_grid_offset_mm", column="lung_grid_offset_voxels",
               min_value=0, max_value=cfg.grid_tolerance_voxels),
        _check("lesion_inside_lung", True, between, "lung_source", column="lesion_outside_lung_fraction",
               min_value=0, max_value=cfg.lesion_outside_lung_max, row_condition=Column("lung_source") == "manifest"),
        # An automatic lung mask tends to leave out dense lesions at the pleura: a hint, not proof.
        _check("lesion_inside_segmented_lung", False, between, "lung_source", column="lesion_outside_lung_fraction",
               min_value=0, max_value=cfg.lesion_outside_lung_max, row_condition=Column("lung_source") == "lungseg"),
        _check("normal_without_lesions", False, between, "lesion_volume_ml", column="lesion_voxels", max_value=0,
               row_condition=Column("label") == "normal"),
    ]


# ------------------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class Finding:
    """One failing (case, check) with the value great-expectations found unexpected."""

    check: str
    level: str
    case_id: str
    line: int | None
    observed: str
    column: str | None = None
    detail: str | None = None


@dataclass
class ValidationReport:
    """Outcome of :func:`validate_cohort`; ``passed`` is False when any blocking check failed."""

    manifest: str
    n_cases: int
    failures: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)
    cases: Any = None  # pandas DataFrame of per-case measurements (checks.csv), None if not measured
    timing_s: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def status(self) -> str:
        if self.failures:
            return "failed"
        return "passed_with_warnings" if self.warnings else "passed"

    def summary(self, limit: int = 15) -> str:
        """One line of status, then the blocking failures (at most `limit`)."""
        head = (f"validation {self.status}: {self.n_cases} case(s), {len(self.failures)} blocking failure(s), "
                f"{len(self.warnings)} warning(s)")
        lines = [head] + [f"  {f.case_id}: {f.check} failed, {_observed_text(f)}" for f in self.failures[:limit]]
        if len(self.failures) > limit:
            lines.append(f"  ... and {len(self.failures) - limit} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "manifest": self.manifest,
            "n_cases": self.n_cases,
            "class_counts": self.class_counts,
            "n_blocking_failures": len(self.failures),
            "n_warnings": len(self.warnings),
            "failures": [asdict(f) for f in self.failures],
            "warnings": [asdict(f) for f in self.warnings],
            "notes": self.notes,
            "checks": self.checks,
        }


def findings_of(check: Check, result: Any, table: "pd.DataFrame") -> list[Finding]:
    """Findings of one failed expectation, from GE's unexpected index list (empty on success)."""
    if result.success:
        return []
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return [Finding(check.name, check.level, COHORT, None, f"expectation could not run: {info.get('exception_message')}")]
    entries = (result.result or {}).get("unexpected_index_list") or []
    if not entries:
        return [Finding(check.name, check.level, COHORT, None, _cohort_observed(check, result))]
    details = table.set_index("line")[check.detail] if check.detail and "line" in table else None
    return [_entry_finding(check, entry, details) for entry in entries]


def _entry_finding(check: Check, entry: Mapping[str, Any], details: Any) -> Finding:
    expectation = check.expectation
    if hasattr(expectation, "column_A"):
        column = f"{expectation.column_A} vs {expectation.column_B}"
        observed = f"{_text(entry.get(expectation.column_A))} vs {_text(entry.get(expectation.column_B))}"
    else:
        column, observed = expectation.column, _text(entry.get(expectation.column))
    if "class" in entry:  # the classes table: one row per class
        return Finding(check.name, check.level, COHORT, None, f"{entry['class']}: {observed} case(s)", column)
    line = int(entry["line"]) if entry.get("line") is not None else None
    case_id = entry.get("case_id")
    case = str(case_id) if _present(case_id) else f"line {line}"
    detail = None
    if details is not None and line in details.index and _present(details.get(line)):
        detail = f"{check.detail}={_text(details.get(line))}"
    return Finding(check.name, check.level, case, line, observed, column, detail)


def _observed_text(finding: Finding) -> str:
    """``column = value`` for per-case findings; cohort findings carry their own wording."""
    text = f"{finding.column} = {finding.observed}" if finding.column and finding.case_id != COHORT else finding.observed
    return f"{text} ({finding.detail})" if finding.detail else text


def _cohort_observed(check: Check, result: Any) -> str:
    observed = (result.result or {}).get("observed_value")
    column = getattr(check.expectation, "column", None)
    if check.name in ("required_column", "optional_column"):
        return f"column '{column}' is missing"
    return f"{column}: {_text(observed)}" if column else f"row count = {_text(observed)}"


def _missing(value: Any) -> bool:
    """None, NaN, pandas NA (scalars only)."""
    import pandas as pd

    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _present(value: Any) -> bool:
    return not _missing(value) and str(value) != ""


def _text(value: Any) -> str:
    """A short, stable rendering of a measured value (numbers to 5 significant digits)."""
    if _missing(value):
        return "missing"
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


# --------------------------------------------------------------------------------- great_expectations
class ExpectationRunner:
    """An ephemeral GE context that validates pandas tables, one checkpoint per table."""

    def __init__(self) -> None:
        logging.getLogger("great_expectations").setLevel(logging.WARNING)  # before import: it logs while importing
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        for name, node in list(logging.root.manager.loggerDict.items()):  # some GE modules pin INFO
            if name.startswith("great_expectations.") and isinstance(node, logging.Logger):
                node.setLevel(logging.WARNING)
        self._gx = gx
        self._context = gx.get_context(mode="ephemeral")
        self._context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self._source = self._context.data_sources.add_pandas("deepsc_cohort")

    def run(self, table: str, frame: "pd.DataFrame", checks: list[Check], id_columns: list[str]) -> list[tuple[Check, Any]]:
        """Validate `frame` against `checks`; each check paired with its ExpectationValidationResult."""
        gx = self._gx
        batch = self._source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(f"{table}_all")
        suite = self._context.suites.add(gx.ExpectationSuite(name=f"{table}_suite"))
        for index, check in enumerate(checks):
            check.expectation.meta["key"] = index
            suite.add_expectation(check.expectation)
        definition = self._context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{table}_validation", data=batch, suite=suite))
        checkpoint = self._context.checkpoints.add(gx.Checkpoint(
            name=f"{table}_checkpoint", validation_definitions=[definition],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": id_columns}))
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        results = [r for run in outcome.run_results.values() for r in run.results]
        by_key = {r.expectation_config.meta["key"]: r for r in results}
        return [(check, by_key[index]) for index, check in enumerate(checks)]


# ------------------------------------------------------------------------------------------ manifest
def read_manifest(path: Path) -> "pd.DataFrame":
    """The manifest as strings, empty cells as missing, labels lower-cased, plus ``line`` (header
    = line 1; blank lines are skipped but counted, so findings point at the file's own line numbers).

    Raises:
        InputError: the file is missing, unreadable or cannot be parsed as CSV.
    """
    import pandas as pd

    if not path.is_file():
        raise InputError(str(path), "manifest file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(str(path), f"manifest cannot be parsed as CSV: {str(exc).strip()}") from None
    except OSError as exc:
        raise InputError(str(path), f"manifest cannot be read: {exc.strerror or exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = frame.astype(object).apply(lambda col: col.map(lambda v: (v.strip() or None) if isinstance(v, str) else v))
    frame.insert(0, "line", range(2, len(frame) + 2))
    blank = frame.drop(columns="line").isna().all(axis=1)
    frame = frame[~blank].reset_index(drop=True)
    if "label" in frame:
        frame["label"] = frame["label"].map(lambda v: normalise_label(v) if isinstance(v, str) else v)
    return frame


def resolve_files(frame: "pd.DataFrame", root: Path) -> "pd.DataFrame":
    """Add optional columns that are absent and the file columns the checks need (``root``: the
    manifest's folder, :func:`deepsc.data.manifest.manifest_folder`)."""
    frame = frame.copy()
    for column in OPTIONAL_COLUMNS:
        if column not in frame:
            frame[column] = None
    for column, flag in (("image_path", "image_exists"), ("mask_path", "mask_exists"), ("lung_path", "lung_exists")):
        frame[flag] = [_resolve(root, p).exists() if _present(p) else None for p in frame[column]]
    frame["image_file"] = [same_file_key(str(_resolve(root, p))) if _present(p) else None for p in frame["image_path"]]
    frame["case_id_folded"] = _folded_case_ids(frame["case_id"])
    frame["has_mask"] = [_present(p) for p in frame["mask_path"]]
    return frame


def _folded_case_ids(case_ids: Any) -> list[str | None]:
    """:func:`~deepsc.data.manifest.case_id_key` of each id at its first row, None at repeats of
    an id (case_id_unique reports those) and for missing ids: only distinct ids that differ in
    letter case alone collide in this column."""
    seen: set[str] = set()
    folded: list[str | None] = []
    for case in case_ids:
        folded.append(case_id_key(str(case)) if _present(case) and str(case) not in seen else None)
        if _present(case):
            seen.add(str(case))
    return folded


def iter_cases(frame: "pd.DataFrame", root: Path) -> Iterator[CaseFiles]:
    """Resolved files of each manifest row (None where the manifest names no existing file)."""
    for row in frame.itertuples(index=False):
        yield CaseFiles(
            line=int(row.line),
            case_id=row.case_id if _present(row.case_id) else None,
            label=row.label if _present(row.label) else None,
            image=_resolve(root, row.image_path) if row.image_exists else None,
            mask=_resolve(root, row.mask_path) if row.mask_exists else None,
            lung=_resolve(root, row.lung_path) if row.lung_exists else None,
        )


def class_table(frame: "pd.DataFrame") -> "pd.DataFrame":
    import pandas as pd

    counts = frame["label"].value_counts()
    return pd.DataFrame({"class": list(CLASSES), "n_cases": [int(counts.get(c, 0)) for c in CLASSES]})


def _resolve(root: Path, value: str) -> Path:
    """A manifest cell as the stages read it (:func:`deepsc.data.manifest.resolve_path`)."""
    return Path(resolve_path(value, root))


# ------------------------------------------------------------------------------------------- stage
def validate_cohort(manifest: Path, report_dir: Path, params: Mapping[str, Any]) -> "ValidationReport":
    """Validate a cohort manifest and its volumes; write the reports; raise if a blocking check fails.

    Writes ``report_dir/validation.json``, ``validation.html`` and ``checks.csv`` (the per-case
    measurements) atomically, also when the gate fails. Files under the manifest are only read.

    Args:
        manifest: the cohort manifest CSV (paths relative to its folder, or absolute).
        report_dir: output folder (created).
        params: the merged params.yaml mapping (``validate``; ``lungseg`` for the lung fallback).

    Raises:
        ValidationFailed: a blocking check failed, or the manifest cannot be parsed; the message
            names the failing cases and checks.
        ConfigError: bad ``validate`` settings.
    """
    manifest, report_dir = Path(manifest), Path(report_dir)
    cfg = ValidateConfig.from_params(params)
    report = ValidationReport(manifest=str(manifest), n_cases=0)
    with _timed(report, "total"):
        try:
            frame = read_manifest(manifest)
        except InputError as exc:
            report.failures.append(Finding("manifest_parses", "blocking", COHORT, None, exc.problem))
            return _finish(report, report_dir)
        report.n_cases = len(frame)
        with _timed(report, "ge_setup"):
            runner = ExpectationRunner()
        with _timed(report, "manifest_expectations"):
            frame = _validate_manifest(report, runner, frame, manifest_folder(manifest), cfg)
        if frame is not None:
            _validate_volumes(report, runner, frame, manifest_folder(manifest), cfg, params)
    return _finish(report, report_dir)


def _validate_manifest(report: ValidationReport, runner: ExpectationRunner, frame: "pd.DataFrame", root: Path,
                       cfg: ValidateConfig) -> "pd.DataFrame | None":
    """Column, manifest and class suites; the resolved manifest, or None when columns are missing."""
    _add_findings(report, runner.run("manifest_columns", frame, column_checks(), ["line"]), frame, "manifest")
    if report.failures:  # without the required columns nothing else can be checked
        return None
    frame = resolve_files(frame, root)
    classes = class_table(frame)
    report.class_counts = dict(zip(classes["class"], classes["n_cases"].astype(int)))
    _add_findings(report, runner.run("manifest", frame, manifest_checks(), ["line", "case_id"]), frame, "manifest")
    _add_findings(report, runner.run("classes", classes, class_checks(cfg), ["class"]), classes, "classes")
    return frame


def _validate_volumes(report: ValidationReport, runner: ExpectationRunner, frame: "pd.DataFrame", root: Path,
                      cfg: ValidateConfig, params: Mapping[str, Any]) -> None:
    """Measure every case (streaming), then run the volume suite on the per-case table."""
    segmenter, why_not = lung_segmenter(params)
    with _timed(report, "measure"):
        report.cases = measure_cohort(frame, root, cfg, segmenter)
    skipped = int((report.cases["lung_source"] == "unavailable").sum())
    if skipped:
        report.notes.append(f"lesion_inside_lung skipped for {skipped} case(s) without lung_path: {why_not}")
    with _timed(report, "volume_expectations"):
        outcomes = runner.run("volumes", report.cases, volume_checks(cfg), ["line", "case_id"])
        _add_findings(report, outcomes, report.cases, "volumes")


@contextlib.contextmanager
def _timed(report: ValidationReport, key: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        report.timing_s[key] = round(time.perf_counter() - started, 3)


def measure_cohort(frame: "pd.DataFrame", root: Path, cfg: ValidateConfig,
                   segmenter: LungSegmenter | None) -> "pd.DataFrame":
    """One row of :data:`~deepsc.data.volume_checks.VOLUME_COLUMNS` per manifest row, one scan in memory at a time."""
    import pandas as pd

    rows = []
    for index, case in enumerate(iter_cases(frame, root), start=1):
        rows.append(measure_case(case, max_voxels=cfg.max_voxels, lung_segmenter=segmenter))
        logger.debug("measured %s (%d/%d) in %.2f s", case.name, index, len(frame), rows[-1]["seconds"])
    cases = pd.DataFrame(rows, columns=list(VOLUME_COLUMNS))
    for column in FLOAT_COLUMNS:
        cases[column] = pd.to_numeric(cases[column], errors="coerce").astype("float64")
    for column in COUNT_COLUMNS:
        cases[column] = pd.to_numeric(cases[column], errors="coerce").astype("Int64")
    return cases


def lung_segmenter(params: Mapping[str, Any]) -> tuple[LungSegmenter | None, str | None]:
    """`deepsc.data.lungseg.segment_lungs` bound to the ``lungseg`` settings, or (None, why not)."""
    try:
        from deepsc.data.lungseg import segment_lungs_from_params
    except ImportError as exc:
        return None, f"deepsc.data.lungseg is not available ({exc})"
    settings = dict(params.get("lungseg") or {})
    return (lambda volume: segment_lungs_from_params(volume, settings)), None


def _add_findings(report: ValidationReport, outcomes: list[tuple[Check, Any]], table: "pd.DataFrame", name: str) -> None:
    for check, result in outcomes:
        findings = findings_of(check, result, table)
        (report.failures if check.blocking else report.warnings).extend(findings)
        report.checks.append({
            "name": check.name, "table": name, "level": check.level,
            "expectation": result.expectation_config.type,
            "rule": _rule(result.expectation_config.kwargs),
            "column": getattr(check.expectation, "column", None) or getattr(check.expectation, "column_A", None),
            "success": bool(result.success), "n_findings": len(findings),
        })


def _rule(kwargs: Mapping[str, Any]) -> str:
    """The expectation's arguments other than its column(s), e.g. ``min_value=16, max_value=2000``."""
    shown = {k: v for k, v in kwargs.items() if k not in ("column", "column_A", "column_B", "batch_id", "result_format")
             and v is not None}
    condition = shown.pop("row_condition", None)
    rule = ", ".join(f"{k}={v}" for k, v in shown.items())
    if isinstance(condition, Mapping) and "column" in condition:  # GE's serialised ComparisonCondition
        rule += f" where {condition['column'].get('name')} {condition.get('operator')} {condition.get('parameter')}"
    return rule.strip()


def _finish(report: ValidationReport, report_dir: Path) -> ValidationReport:
    by_line = lambda f: (f.line is not None, f.line or 0)  # noqa: E731 - cohort findings first, then by line
    report.failures.sort(key=by_line)
    report.warnings.sort(key=by_line)
    write_reports(report, report_dir)
    if not report.passed:
        raise ValidationFailed(f"{report.summary()}\nreport: {report_dir / 'validation.html'}")
    logger.debug("%s", report.summary())
    return report


# ------------------------------------------------------------------------------------------ writing
def write_reports(report: ValidationReport, report_dir: Path) -> None:
    """validation.json, validation.html and checks.csv, each written atomically.

    The files depend on the cohort and the settings only: timings go to the log, so a re-run on
    the same data writes the same bytes and dvc does not re-run the stages gated on them.
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    logger.info("validation timing (s): %s", json.dumps(report.timing_s))
    payload = json.dumps(report.to_dict(), indent=2, default=_text) + "\n"
    atomic_write_bytes(report_dir / "validation.json", payload.encode())
    atomic_write_bytes(report_dir / "validation.html", render_html(report).encode())
    if report.cases is not None:
        table = report.cases.drop(columns=["seconds"], errors="ignore")
        atomic_write_bytes(report_dir / "checks.csv", table.to_csv(index=False).encode())
    else:
        (report_dir / "checks.csv").unlink(missing_ok=True)  # no stale table from an earlier run


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0;
font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#eee}
.failed{color:#b00020}.passed{color:#1b7f3b}.passed_with_warnings{color:#a66300}.blocking{background:#fde7e9}
.warning{background:#fff4e0}"""

CASE_OVERVIEW = ("case_id", "label", "shape", "spacing_mm", "hu_min", "hu_p01", "hu_max", "lesion_voxels",
                 "lesion_outside_lung_fraction", "lung_source")


def render_html(report: ValidationReport) -> str:
    """A self-contained page: summary, failures, warnings, checks, and every case."""
    esc = html.escape
    counts = ", ".join(f"{k}: {v}" for k, v in report.class_counts.items()) or "n/a"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Validation: {esc(report.manifest)}</title>",
        f"<style>{_CSS}</style></head><body><h1>Cohort validation</h1>",
        f"<p>Manifest <code>{esc(report.manifest)}</code>: <b class='{report.status}'>{report.status.upper()}</b></p>",
        f"<ul><li>{report.n_cases} case(s); per class: {esc(counts)}</li>",
        f"<li>{len(report.failures)} blocking failure(s), {len(report.warnings)} warning(s)</li></ul>",
    ]
    parts += [f"<p class='warning'>Note: {esc(n)}</p>" for n in report.notes]
    finding_columns = ("case_id", "line", "check", "column", "observed", "detail")
    parts += _html_table("Blocking failures", finding_columns, [asdict(f) for f in report.failures], "blocking")
    parts += _html_table("Warnings", finding_columns, [asdict(f) for f in report.warnings], "warning")
    parts += _html_table("Checks", ("name", "table", "level", "expectation", "column", "rule", "success", "n_findings"),
                         report.checks)
    parts += _html_table("All cases", ("status", "failing checks") + CASE_OVERVIEW, _case_overview(report))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _case_overview(report: ValidationReport) -> list[dict[str, Any]]:
    if report.cases is None:
        return []
    flagged: dict[int, list[Finding]] = {}
    for finding in report.failures + report.warnings:
        if finding.line is not None:
            flagged.setdefault(finding.line, []).append(finding)
    rows = []
    for record in report.cases.to_dict("records"):
        found = flagged.get(int(record["line"]), [])
        status = "blocking" if any(f.level == "blocking" for f in found) else "warning" if found else "ok"
        rows.append({"status": status, "failing checks": ", ".join(sorted({f.check for f in found})),
                     **{k: record.get(k) for k in CASE_OVERVIEW}})
    return rows


def _html_table(title: str, columns: tuple[str, ...], rows: list[Mapping[str, Any]], row_class: str = "") -> list[str]:
    esc = html.escape
    if not rows:
        return [f"<h2>{esc(title)}</h2><p>none</p>"]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        css = row_class or row.get("status", "")
        cells = "".join(f"<td>{esc(_text(row.get(c)) if row.get(c) is not None else '')}</td>" for c in columns)
        body.append(f"<tr class='{esc(str(css))}'>{cells}</tr>")
    return [f"<h2>{esc(title)} ({len(rows)})</h2><table><tr>{head}</tr>", *body, "</table>"]


# --------------------------------------------------------------------------------------------- CLI
def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, default=None, help="cohort manifest (default: paths.manifest)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: <outputs>/validation)")


def run_cli(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    manifest = args.manifest or Path(params.get("paths", {}).get("manifest", "data/manifest.csv"))
    out = args.out or outputs_dir(params) / "validation"
    report = validate_cohort(manifest, out, params)
    print(report.summary())
    print(f"report: {out / 'validation.html'}")
    return 0
