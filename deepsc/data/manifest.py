"""The cohort manifest (``data/manifest.csv``): loading, validation, writing, importers.

Columns (docs/architecture.md): ``case_id`` (unique, ``[A-Za-z0-9._-]+``, and unique ignoring
letter case: ids become folder names), ``label`` (covid | cap | normal, any letter case: read
lower-cased), ``image_path`` (each scan once: two rows naming the same file, or a DICOM series
folder and a file in it, are refused), ``mask_path`` (lesion mask, may be empty),
``lung_path`` (true lung mask, may be empty), ``source`` (free text), and optionally
``patient_id`` (free text, may be empty: the scans of one patient stay together in the split,
see :mod:`deepsc.data.split`). In the file, paths are relative to the manifest's folder (or
absolute); :func:`load_manifest` returns them absolute (:func:`resolve_path`, the one resolver
that every stage and the validation gate use) and :func:`write_manifest` writes them relative
again. Extra columns are kept.

Importers (``deepsc import --layout ... --root DIR``) build a manifest from public data:

* ``covid-ct-md`` -- COVID-CT-MD (Afshar et al. 2021)::

      ROOT/COVID-19 subjects/<ID>/*.dcm   -> covid
      ROOT/CAP subjects/<ID>/*.dcm        -> cap
      ROOT/Normal subjects/<ID>/*.dcm     -> normal

  One DICOM series per subject folder (``case_id`` = the folder name); ``... cases`` folder
  names are accepted too. The dataset has no voxel masks.

* ``nifti`` -- either an nnU-Net raw dataset::

      ROOT/imagesTr/<case>_0000.nii.gz  (+ ROOT/labelsTr/<case>.nii.gz, the lesion mask)
      ROOT/imagesTs/<case>_0000.nii.gz  (+ ROOT/labelsTs/<case>.nii.gz when present)

  whose class labels come from a CSV (``--labels``, columns ``case_id,label``) and/or
  ``--default-label``; or a MosMedData (Morozov et al. 2020) folder::

      ROOT/studies/CT-0/<study>.nii.gz            -> normal
      ROOT/studies/CT-1 ... CT-4/<study>.nii.gz   -> covid (severity 1-4)
      ROOT/masks/<study>_mask.nii.gz              (lesion masks, a subset of CT-1)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from deepsc import CLASSES
from deepsc.errors import InputError

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("case_id", "label", "image_path", "mask_path", "lung_path", "source")
REQUIRED_COLUMNS = ("case_id", "label", "image_path")
PATH_COLUMNS = ("image_path", "mask_path", "lung_path")
PATIENT_COLUMN = "patient_id"
"""Optional: scans sharing a non-empty patient id are kept in one subset and fold by the split."""
CASE_ID_REGEX = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"
"""A case id names files and folders: no path separators, and no leading dot ("." and ".."
are the folder itself and its parent)."""
CASE_ID_PATTERN = re.compile(CASE_ID_REGEX)
LAYOUTS = ("covid-ct-md", "nifti")

COVID_CT_MD_CLASSES = {"covid-19": "covid", "cap": "cap", "normal": "normal"}
_COVID_CT_MD_FOLDER = re.compile(r"^(covid-19|cap|normal)[ _-]+(subjects|cases)$", re.IGNORECASE)
_NNUNET_IMAGE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")
_NIFTI_NAME = re.compile(r"^(?P<stem>.+)\.nii(\.gz)?$")
_MAX_LISTED = 50


def load_manifest(path: str | os.PathLike, *, check_files: bool = True) -> Any:
    """Read and validate a manifest; paths come back absolute.

    Args:
        path: the CSV file.
        check_files: also require every image / mask path to exist (the split stage, which
            needs only ids and labels, turns this off).

    Returns:
        ``pandas.DataFrame`` with at least :data:`MANIFEST_COLUMNS` (str, empty = none), labels
        lower-cased, paths absolute; ``df.attrs["manifest_path"]`` is the file read.

    Raises:
        InputError: unreadable file, missing columns, or bad rows -- every problem of every row
            in one message (rows numbered from 1, the header excluded).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "manifest file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise InputError(str(path), f"not a readable CSV manifest: {' '.join(str(exc).split())}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = _complete(frame, str(path))
    base = manifest_folder(path)
    for column in PATH_COLUMNS:
        frame[column] = [resolve_path(value, base) for value in frame[column]]
    problems = validate_manifest(frame, check_files=check_files)
    if problems:
        raise InputError(str(path), _problem_report(problems))
    frame.attrs["manifest_path"] = str(path)
    return frame


def validate_manifest(frame: Any, *, check_files: bool = True) -> list[str]:
    """Every problem of a manifest frame (absolute paths expected), one line each; [] if fine."""
    problems: list[str] = []
    rows_of: dict[str, list[int]] = {}
    for row, record in enumerate(frame.to_dict("records"), start=1):
        case = record["case_id"]
        where = f"row {row} (case {case!r})" if case else f"row {row}"
        rows_of.setdefault(case, []).append(row)
        if not case:
            problems.append(f"{where}: empty case_id")
        elif not CASE_ID_PATTERN.fullmatch(case):
            problems.append(f"{where}: case_id may hold only letters, digits, '.', '_' and '-', and may not start with '.'")
        if record["label"] not in CLASSES:
            problems.append(f"{where}: label {record['label']!r} is not one of {', '.join(CLASSES)}")
        if not record["image_path"]:
            problems.append(f"{where}: empty image_path")
        if check_files:
            for column in PATH_COLUMNS:
                if record[column] and not Path(record[column]).exists():
                    problems.append(f"{where}: {column} not found: {record[column]}")
    for case, rows in rows_of.items():
        if case and len(rows) > 1:
            problems.append(f"case_id {case!r} appears in rows {', '.join(map(str, rows))}: ids must be unique")
    problems += _ids_equal_ignoring_case(rows_of)
    problems += _shared_images(frame)
    if frame.empty:
        problems.append("the manifest has no rows")
    return problems


def case_id_key(case: str) -> str:
    """A key equal for two case ids that name one folder on a case-insensitive file system
    (macOS, Windows shares): ``Case_01`` and ``case_01`` must not both be in a cohort."""
    return case.casefold()


def _ids_equal_ignoring_case(rows_of: Mapping[str, list[int]]) -> list[str]:
    """One problem per group of distinct ids equal under :func:`case_id_key` (exact repeats of one
    id are reported as not unique, not here)."""
    groups: dict[str, list[str]] = {}
    for case in rows_of:
        if case:
            groups.setdefault(case_id_key(case), []).append(case)
    problems = []
    for cases in groups.values():
        if len(cases) > 1:
            named = ", ".join(
                f"{case!r} (row{'s' if len(rows_of[case]) > 1 else ''} {', '.join(map(str, rows_of[case]))})" for case in cases
            )
            problems.append(
                f"case_ids {named} differ only in letter case: they would share one output folder on a case-insensitive "
                "file system (macOS, Windows shares); ids must differ in more than letter case"
            )
    return problems


def _shared_images(frame: Any) -> list[str]:
    """One problem per image file (:func:`same_file_key`: links followed, a DICOM file counts as
    its series folder) named by several rows: the same scan twice could land in both train and test."""
    rows_of: dict[str, list[tuple[int, str]]] = {}
    for row, record in enumerate(frame.to_dict("records"), start=1):
        if record["image_path"]:
            rows_of.setdefault(same_file_key(record["image_path"]), []).append((row, record["case_id"]))
    return [
        f"rows {', '.join(str(r) for r, _ in rows)} (cases {', '.join(repr(c) for _, c in rows)}) name the same image {image}: "
        "each scan may appear once (a scan in both train and test inflates the metrics)"
        for image, rows in rows_of.items()
        if len(rows) > 1
    ]


def same_file_key(path: str) -> str:
    """A key equal for two absolute paths that name the same scan: the same file or folder (links
    resolved), and a DICOM file stands for its folder, since :func:`deepsc.data.io.read_ct` reads
    the series of the file's folder (a DICOM folder and a file in it, or two of its files, are one
    scan). Used by the manifest check and the validation gate (``image_file``)."""
    from deepsc.data.io import detect_format

    if os.path.isfile(path):
        try:
            if detect_format(Path(path), "") == "dicom":
                return os.path.realpath(os.path.dirname(path))
        except InputError:  # not a supported image: the file itself is the key
            pass
    return os.path.realpath(path)


def write_manifest(frame: Any, path: str | os.PathLike) -> Path:
    """Write a manifest atomically, with paths relative to its folder (POSIX separators).

    Relative paths in `frame` are taken relative to the current directory. Columns come in the
    order of :data:`MANIFEST_COLUMNS`, then any extra ones; rows keep their order.
    """
    from deepsc.data.volume import atomic_write_bytes

    path = Path(path)
    frame = _complete(frame.copy(), str(path))
    base = manifest_folder(path)
    for column in PATH_COLUMNS:
        frame[column] = [_relative(value, base) for value in frame[column]]
    columns = list(MANIFEST_COLUMNS) + [c for c in frame.columns if c not in MANIFEST_COLUMNS]
    atomic_write_bytes(path, frame[columns].to_csv(index=False, lineterminator="\n").encode("utf-8"))
    return path


# --------------------------------------------------------------------------- importers


def import_covid_ct_md(root: str | os.PathLike) -> Any:
    """Manifest rows (absolute paths) for a COVID-CT-MD folder; see the module docstring."""
    root = _existing_folder(root)
    rows: list[dict[str, str]] = []
    problems: list[str] = []
    class_folders = sorted(p for p in root.iterdir() if p.is_dir() and _COVID_CT_MD_FOLDER.match(p.name))
    if not class_folders:
        raise InputError(
            str(root),
            "no COVID-CT-MD class folder found: expected 'COVID-19 subjects', 'CAP subjects' and/or 'Normal subjects'",
        )
    for class_folder in class_folders:
        label = COVID_CT_MD_CLASSES[_COVID_CT_MD_FOLDER.match(class_folder.name).group(1).lower()]
        for subject in sorted(p for p in class_folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not any(f.is_file() and not f.name.startswith(".") for f in subject.iterdir()):
                problems.append(f"{subject}: no files (expected the DICOM files of one series directly inside)")
                continue
            rows.append(_row(subject.name, label, subject, source="COVID-CT-MD"))
    if problems:
        raise InputError(str(root), _problem_report(problems))
    return _frame(rows, root)


def import_nifti_folder(
    root: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    default_label: str | None = None,
) -> Any:
    """Manifest rows (absolute paths) for an nnU-Net or MosMedData NIfTI folder.

    Args:
        root: the dataset folder (layouts in the module docstring).
        labels: CSV ``case_id,label`` giving the class of nnU-Net cases.
        default_label: class of nnU-Net cases the CSV does not list (e.g. ``covid`` for a
            lesion-segmentation challenge where every scan is COVID-19).

    Raises:
        InputError: unknown layout, cases without a class, labels given for MosMedData.
    """
    root = _existing_folder(root)
    if default_label is not None and default_label not in CLASSES:
        raise InputError(str(root), f"default label {default_label!r} is not one of {', '.join(CLASSES)}")
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        class_of = _read_label_csv(Path(labels)) if labels is not None else {}
        return _import_nnunet(root, class_of, default_label)
    if (root / "studies").is_dir():
        if labels is not None or default_label is not None:
            raise InputError(str(root), "MosMedData classes come from the CT-0..CT-4 folders: do not pass labels")
        return _import_mosmed(root)
    raise InputError(
        str(root),
        "unknown NIfTI layout: expected imagesTr/ (nnU-Net) or studies/CT-0..CT-4 (MosMedData) inside",
    )


def import_cohort(
    layout: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    default_label: str | None = None,
) -> Any:
    """Import a public dataset folder, validate the rows and write the manifest to `out`."""
    if layout == "covid-ct-md":
        if labels is not None or default_label is not None:
            raise InputError(str(root), "COVID-CT-MD classes come from its folders: do not pass labels")
        frame = import_covid_ct_md(root)
    elif layout == "nifti":
        frame = import_nifti_folder(root, labels, default_label)
    else:
        raise InputError(str(root), f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    problems = validate_manifest(frame)
    if problems:
        raise InputError(str(root), _problem_report(problems))
    write_manifest(frame, out)
    counts = frame["label"].value_counts()
    summary = ", ".join(f"{int(counts.get(c, 0))} {c}" for c in CLASSES)
    logger.info("wrote %s: %d cases (%s), %d with a lesion mask", out, len(frame), summary, int((frame["mask_path"] != "").sum()))
    return frame


def _import_nnunet(root: Path, class_of: Mapping[str, str], default_label: str | None) -> Any:
    rows: list[dict[str, str]] = []
    unlabelled: list[str] = []
    extra_channels: set[str] = set()
    for images, masks in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for image in sorted((root / images).glob("*.nii*")):
            match = _NNUNET_IMAGE.match(image.name)
            if not match:
                continue
            case = match.group("case")
            if match.group("channel") != "0000":
                extra_channels.add(case)
                continue
            label = class_of.get(case, default_label)
            if label is None:
                unlabelled.append(case)
                continue
            mask = _first_existing(root / masks / f"{case}.nii.gz", root / masks / f"{case}.nii")
            rows.append(_row(case, label, image, mask=mask, source=f"nnU-Net {root.name}"))
    if unlabelled:
        raise InputError(
            str(root),
            f"{len(unlabelled)} case(s) have no class ({', '.join(unlabelled[:10])}{', ...' if len(unlabelled) > 10 else ''}): "
            "list them in --labels CSV (case_id,label) or pass --default-label",
        )
    if extra_channels:
        logger.warning("%s: ignored extra channels (_0001 ...) of %d case(s): CT is one channel", root, len(extra_channels))
    unknown = sorted(set(class_of) - {r["case_id"] for r in rows})
    if unknown:
        logger.warning("%s: the labels CSV lists %d case(s) not in the folder: %s", root, len(unknown), ", ".join(unknown[:10]))
    return _frame(rows, root)


def _import_mosmed(root: Path) -> Any:
    rows: list[dict[str, str]] = []
    for grade in range(5):
        folder = root / "studies" / f"CT-{grade}"
        if not folder.is_dir():
            continue
        label = "normal" if grade == 0 else "covid"
        for image in sorted(folder.glob("*.nii*")):
            match = _NIFTI_NAME.match(image.name)
            if not match:
                continue
            stem = match.group("stem")
            mask = _first_existing(root / "masks" / f"{stem}_mask.nii.gz", root / "masks" / f"{stem}_mask.nii")
            rows.append(_row(stem, label, image, mask=mask, source=f"MosMedData CT-{grade}"))
    if not rows:
        raise InputError(str(root), "no studies found under studies/CT-0 ... studies/CT-4")
    return _frame(rows, root)


def _read_label_csv(path: Path) -> dict[str, str]:
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise InputError(str(path), f"not a readable labels CSV: {' '.join(str(exc).split())}") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("case_id", "label") if c not in table.columns]
    if missing:
        raise InputError(str(path), f"labels CSV lacks column(s) {', '.join(missing)} (needs case_id,label)")
    labels = {str(c).strip(): str(v).strip().lower() for c, v in zip(table["case_id"], table["label"])}
    bad = sorted(case for case, label in labels.items() if label not in CLASSES)
    if bad:
        raise InputError(str(path), f"unknown label for case(s) {', '.join(bad[:10])}: labels are {', '.join(CLASSES)}")
    if len(labels) != len(table):
        raise InputError(str(path), "a case_id appears more than once in the labels CSV")
    return labels


# --------------------------------------------------------------------------- helpers


def _complete(frame: Any, where: str) -> Any:
    """Check required columns, add missing optional ones, normalise text cells."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(
            where,
            f"missing column(s) {', '.join(missing)} (found: {', '.join(map(str, frame.columns)) or 'none'}); "
            f"a manifest needs {', '.join(REQUIRED_COLUMNS)}",
        )
    for column in MANIFEST_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    for column in (*MANIFEST_COLUMNS, PATIENT_COLUMN):
        if column in frame.columns:
            frame[column] = [str(v).strip() for v in frame[column]]
    frame["label"] = [normalise_label(v) for v in frame["label"]]
    return frame


def normalise_label(value: str) -> str:
    """A label as the pipeline compares it: lower case (``NORMAL``, ``Covid`` are accepted)."""
    return value.lower()


def expand_user(value: str) -> Path:
    """``~`` and ``~user`` expanded; left as written when that user has no home here (a manifest
    from another machine), so the row fails as "file not found" with its path, not a RuntimeError."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        return Path(value)


def manifest_folder(path: str | os.PathLike) -> Path:
    """The absolute folder that a manifest's relative paths start from."""
    return Path(os.path.abspath(path)).parent


def resolve_path(value: str, base: str | os.PathLike) -> str:
    """The absolute path of a manifest cell (``""`` stays ``""``): ``~`` expanded, relative to
    ``base`` (:func:`manifest_folder`), ``..`` collapsed textually (``link/..`` is ``base``
    even where ``link`` is a symbolic link). The ONE resolver: the stages (via
    :func:`load_manifest`) and the validation gate read the same file."""
    if not value:
        return ""
    return os.path.normpath(Path(os.path.abspath(base)) / expand_user(value))


def _relative(value: str, base: Path) -> str:
    if not value:
        return ""
    return Path(os.path.relpath(os.path.abspath(value), base)).as_posix()


def _row(case: str, label: str, image: Path, mask: Path | None = None, source: str = "") -> dict[str, str]:
    return {
        "case_id": re.sub(r"[^A-Za-z0-9._-]+", "_", case),
        "label": label,
        "image_path": os.path.abspath(image),
        "mask_path": os.path.abspath(mask) if mask else "",
        "lung_path": "",
        "source": source,
    }


def _frame(rows: Iterable[dict[str, str]], root: Path) -> Any:
    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=list(MANIFEST_COLUMNS))
    if frame.empty:
        raise InputError(str(root), "no cases found")
    return frame


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _existing_folder(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise InputError(str(root), "dataset folder not found")
    return root


def _problem_report(problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return f"{len(problems)} problem(s):\n  " + "\n  ".join(shown) + more


# --------------------------------------------------------------------------- CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", required=True, choices=LAYOUTS, help="dataset layout (see `deepsc.data.manifest`)")
    parser.add_argument("--root", required=True, type=Path, help="dataset folder")
    parser.add_argument("--out", type=Path, default=None, help="manifest to write (default: params paths.manifest)")
    parser.add_argument("--labels", type=Path, default=None, help="nifti layout: CSV case_id,label of nnU-Net cases")
    parser.add_argument("--default-label", choices=CLASSES, default=None, help="nifti layout: class of unlisted nnU-Net cases")


def run_cli(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    out = args.out or Path(params.get("paths", {}).get("manifest", "data/manifest.csv"))
    frame = import_cohort(args.layout, args.root, out, args.labels, args.default_label)
    print(f"wrote {out}: {len(frame)} cases")
    return 0
