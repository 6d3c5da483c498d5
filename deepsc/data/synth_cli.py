"""``deepsc synth``: the command in front of :func:`deepsc.data.synth.synthesize_cohort`, with
the guard that keeps it off data it did not write.

``make run`` calls ``deepsc synth`` before ``dvc repro``. A cohort imported into the synth
folder (``deepsc import ... --out data/manifest.csv``) makes the folder's content differ from
its ``synth.json`` fingerprint, and the generator would then regenerate the folder and delete
the import. The guard refuses instead (``--force`` replaces it anyway). It lives here, not in
``synth.py``, because ``synth.py``'s bytes are part of the cohort's generator fingerprint:
editing that file re-stamps ``data/`` and re-runs every DVC stage.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path
from typing import Any, Mapping

from deepsc.data.synth import STAMP_NAME
from deepsc.data.volume import shareable_mode
from deepsc.errors import InputError

_SYNTH_FILE = re.compile(r"^(images|lungs|masks)/synth_\d+\.nii\.gz$")


def foreign_files(folder: Path) -> list[str]:
    """Files of a synth folder that ``deepsc synth`` does not write, and ``manifest.csv`` when
    rows of it name another source: regenerating would lose them. The generator's own files,
    even damaged ones, may be regenerated."""
    folder = Path(folder)
    found = sorted(rel for rel in (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                   if rel not in ("manifest.csv", STAMP_NAME) and not _SYNTH_FILE.match(rel))
    try:
        with open(folder / "manifest.csv", newline="") as handle:
            sources = [row.get("source") or "" for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error):
        sources = []
    if any(not source.startswith("deepsc-synth") for source in sources):
        found.insert(0, "manifest.csv (rows of another source)")
    return found


def check_replaceable(folder: Path) -> None:
    """Raise ``InputError`` when a synth folder (one with ``synth.json``) holds files of someone else."""
    folder = Path(folder)
    if not (folder / STAMP_NAME).is_file():
        return  # not a synth folder: synthesize_cohort refuses foreign folders itself
    foreign = foreign_files(folder)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(
            str(folder),
            f"holds files deepsc synth did not write ({shown}); refusing to replace them with a synthetic cohort. "
            "Run the stages with `dvc repro` to use this data, choose another --out, or pass --force to replace it",
        )


def add_cli(parser: argparse.ArgumentParser) -> None:
    from deepsc.data import synth

    synth.add_cli(parser)


def run_cli(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    from deepsc.data import synth

    args.out = args.out or Path(params.get("paths", {}).get("data", "data"))
    if not args.force:
        check_replaceable(args.out)
    code = synth.run_cli(args, params)
    if (Path(args.out) / STAMP_NAME).is_file():  # synth renames a mkdtemp folder (0700) into place
        Path(args.out).chmod(shareable_mode(directory=True))
    return code
