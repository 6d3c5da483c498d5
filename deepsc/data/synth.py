"""`deepsc synth`: the embedded, deterministic synthetic chest-CT cohort.

Writes ``<out>/images/<case>.nii.gz`` (int16 HU), ``<out>/masks/<case>.nii.gz`` (uint8 lesion
mask, COVID-19 and CAP only), ``<out>/lungs/<case>.nii.gz`` (uint8 true lung mask),
``<out>/manifest.csv`` (docs/architecture.md) and ``<out>/synth.json`` (settings and a content
fingerprint). Volumes are canonical LPS ``(Z, Y, X)``, ``z = 0`` inferior.

Determinism: every case draws from its own RNG seeded with ``(seed, case index)``; the per-scan
lesion burden (count, LVR, ...) of each class is a stratified sample drawn from ``(seed, class)``
(:func:`deepsc.data.synth_lesions.sample_burdens`), so the same settings and generator code give
byte-identical files. ``synth.json`` records the settings, the generator version and a digest of
the generator's source, and a content fingerprint of the files: a cohort is regenerated when
any of them no longer matches.

Safety: the cohort is written into a temporary sibling folder and renamed into place at the
end (an interrupted run never leaves half a cohort); a folder that holds anything but a synth
cohort (real data!) is never overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from deepsc import CLASSES
from deepsc.errors import ConfigError, InputError

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
MANIFEST_COLUMNS = ("case_id", "label", "image_path", "mask_path", "lung_path", "source")
STAMP_NAME = "synth.json"
GENERATOR_SOURCES = ("synth.py", "synth_anatomy.py", "synth_lesions.py")
HU_RANGE = (-1024, 3071)


@dataclass(frozen=True)
class SynthConfig:
    """The ``synth`` section of params.yaml, checked.

    Attributes:
        seed: master seed of the cohort.
        n_covid, n_cap, n_normal: scans per class.
        inplane_size: rows = columns per slice (voxels).
        inplane_spacing_mm: (low, high) range of the per-case in-plane spacing.
        slice_spacing_mm: (low, high) range of the per-case slice spacing.
        noise_hu: standard deviation of the Gaussian scanner noise (HU).
    """

    seed: int = 20210401
    n_covid: int = 30
    n_cap: int = 30
    n_normal: int = 30
    inplane_size: int = 128
    inplane_spacing_mm: tuple[float, float] = (2.6, 3.0)
    slice_spacing_mm: tuple[float, float] = (4.0, 5.0)
    noise_hu: float = 18.0

    @classmethod
    def from_params(cls, synth: Mapping[str, Any]) -> "SynthConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(synth) - known)
        if unknown:
            raise ConfigError(f"synth: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values = dict(synth)
        for key in ("inplane_spacing_mm", "slice_spacing_mm"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"synth: {exc}") from None

    def __post_init__(self) -> None:
        for name in ("n_covid", "n_cap", "n_normal"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer")
        if self.n_covid + self.n_cap + self.n_normal == 0:
            raise ValueError("the cohort would be empty (n_covid + n_cap + n_normal = 0)")
        if not isinstance(self.inplane_size, int) or not 48 <= self.inplane_size <= 1024:
            raise ValueError("inplane_size must be an integer in [48, 1024] voxels")
        for name, bounds in (("inplane_spacing_mm", (0.3, 6.0)), ("slice_spacing_mm", (0.5, 10.0))):
            low, high = getattr(self, name)
            if not bounds[0] <= low <= high <= bounds[1]:
                raise ValueError(f"{name} must be [low, high] with {bounds[0]} <= low <= high <= {bounds[1]} mm")
        if self.inplane_size * self.inplane_spacing_mm[0] < 300.0:
            raise ValueError("the field of view (inplane_size x inplane_spacing_mm) must be at least 300 mm to hold a chest")
        if not 0.0 <= self.noise_hu <= 200.0:
            raise ValueError("noise_hu must be in [0, 200] HU")

    @property
    def labels(self) -> list[str]:
        """Label of every case, in case-index order (COVID-19, then CAP, then normal)."""
        counts = {"covid": self.n_covid, "cap": self.n_cap, "normal": self.n_normal}
        return [label for label in CLASSES for _ in range(counts[label])]

    def stamp(self) -> dict[str, Any]:
        return {"generator_version": GENERATOR_VERSION, "generator_sha256": generator_digest(), "settings": asdict(self)}


def generator_digest() -> str:
    """SHA-256 of the generator's source files: a cohort made by other code is out of date even
    when nobody remembered to bump :data:`GENERATOR_VERSION`."""
    digest = hashlib.sha256()
    for name in GENERATOR_SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SynthCase:
    """One generated scan (arrays in canonical LPS ``(Z, Y, X)``)."""

    case_id: str
    label: str
    image: Any            # CTVolume, int16 HU
    lesion: Any | None    # CTVolume uint8, None for normal scans
    lung: Any             # CTVolume uint8
    lesions_painted: int


def case_rng(seed: int, case_index: int) -> np.random.Generator:
    """The RNG of one case: independent of every other case and of the cohort size."""
    return np.random.default_rng([int(seed), int(case_index)])


def synthesize_case(config: SynthConfig, case_index: int, label: str, burden: Any | None) -> SynthCase:
    """Generate one scan (anatomy, lungs, lesions for covid/cap, noise).

    Args:
        burden: :class:`deepsc.data.synth_lesions.LesionBurden` for covid and cap scans,
            None for normal scans.
    """
    from deepsc.data.synth_anatomy import ScanGeometry, build_anatomy, finish_image, sample_anatomy, slices_needed
    from deepsc.data.synth_lesions import PROFILES, paint_lesions
    from deepsc.data.volume import CTVolume, lps_affine

    if label not in CLASSES:
        raise ValueError(f"unknown label {label!r}")
    rng = case_rng(config.seed, case_index)
    inplane = round(float(rng.uniform(*config.inplane_spacing_mm)), 3)
    slice_spacing = round(float(rng.uniform(*config.slice_spacing_mm)), 2)
    anatomy_params = sample_anatomy(rng, config.inplane_size * inplane)
    n = config.inplane_size
    geometry = ScanGeometry((slices_needed(anatomy_params, slice_spacing), n, n), (slice_spacing, inplane, inplane))
    anatomy = build_anatomy(rng, geometry, anatomy_params)
    hu = anatomy.hu
    lesion, painted = None, []
    if label != "normal":
        lesion, painted = paint_lesions(rng, geometry, anatomy, hu, burden, PROFILES[label])
    finish_image(hu, anatomy)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(config.noise_hu)
    image = np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)

    origin = (-(n - 1) / 2 * inplane, -(n - 1) / 2 * inplane, -round(float(rng.uniform(150.0, 350.0)), 1))
    affine = lps_affine(geometry.spacing, origin)
    case_id = f"synth_{case_index:04d}"
    meta = {"source": "synthetic", "label": label}
    return SynthCase(
        case_id=case_id,
        label=label,
        image=CTVolume(image, affine, case_id, meta),
        lesion=None if lesion is None else CTVolume(lesion, affine, case_id, meta),
        lung=CTVolume(anatomy.lung.astype(np.uint8), affine, case_id, meta),
        lesions_painted=len(painted),
    )


def cohort_burdens(config: SynthConfig) -> dict[int, Any]:
    """Stratified (count, LVR) per COVID-19 / CAP case index, from ``(seed, class)``."""
    from deepsc.data.synth_lesions import PROFILES, sample_burdens

    labels = config.labels
    burdens: dict[int, Any] = {}
    for class_index, label in enumerate(CLASSES):
        if label not in PROFILES:
            continue
        indices = [i for i, lab in enumerate(labels) if lab == label]
        rng = np.random.default_rng([int(config.seed), 1_000_000 + class_index])
        burdens.update(zip(indices, sample_burdens(rng, PROFILES[label], len(indices))))
    return burdens


def synthesize_cohort(out_dir: Path, params: Mapping[str, Any], force: bool = False) -> Path:
    """Write the synthetic cohort of ``params["synth"]`` into `out_dir`; return the manifest.

    Does nothing when `out_dir` already holds an intact cohort of the same settings. Replaces an
    older synth cohort; refuses (``InputError``) to replace a folder that is not a synth cohort
    unless `force`.
    """
    config = SynthConfig.from_params(params.get("synth", {}) if isinstance(params.get("synth", {}), Mapping) else {})
    out_dir = Path(out_dir)
    if _is_current(out_dir, config):
        log.info("%s already holds the synthetic cohort of these settings: nothing to do", out_dir)
        return out_dir / "manifest.csv"
    _check_replaceable(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.synth-"))
    try:
        started = time.perf_counter()
        _write_cohort(staging, config)
        log.info("generated %d scans in %.1f s", len(config.labels), time.perf_counter() - started)
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / "manifest.csv"


def _write_cohort(folder: Path, config: SynthConfig) -> None:
    from deepsc.data.volume import save_nifti

    burdens = cohort_burdens(config)
    rows = []
    for index, label in enumerate(config.labels):
        case = synthesize_case(config, index, label, burdens.get(index))
        image_rel, lung_rel = f"images/{case.case_id}.nii.gz", f"lungs/{case.case_id}.nii.gz"
        save_nifti(case.image, folder / image_rel, np.int16)
        save_nifti(case.lung, folder / lung_rel, np.uint8)
        mask_rel = ""
        if case.lesion is not None:
            mask_rel = f"masks/{case.case_id}.nii.gz"
            save_nifti(case.lesion, folder / mask_rel, np.uint8)
        source = f"deepsc-synth v{GENERATOR_VERSION} seed={config.seed}"
        rows.append({"case_id": case.case_id, "label": label, "image_path": image_rel, "mask_path": mask_rel, "lung_path": lung_rel, "source": source})
        log.debug("%s (%s): %s, %d lesions", case.case_id, label, case.image.shape, case.lesions_painted)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (folder / "manifest.csv").write_text(buffer.getvalue())
    stamp = config.stamp() | {"content_sha256": content_fingerprint(folder)}
    (folder / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")


def content_fingerprint(folder: Path) -> str:
    """SHA-256 over the relative path and bytes of every cohort file (synth.json excluded)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != STAMP_NAME):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((folder / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _is_current(folder: Path, config: SynthConfig) -> bool:
    stamp = _read_stamp(folder)
    expected = json.loads(json.dumps(config.stamp()))
    if stamp is None or {k: stamp.get(k) for k in expected} != expected:
        return False
    if stamp.get("content_sha256") != content_fingerprint(folder):
        log.warning("%s: the cohort's files differ from its synth.json fingerprint; regenerating", folder)
        return False
    return True


def _check_replaceable(folder: Path, force: bool) -> None:
    if not folder.exists():
        return
    if not folder.is_dir():
        raise InputError(str(folder), "exists and is not a folder; refusing to replace it")
    if force or _read_stamp(folder) is not None or not any(folder.iterdir()):
        return
    raise InputError(
        str(folder),
        f"holds files that are not a deepsc synthetic cohort (no {STAMP_NAME}); refusing to overwrite what may be "
        "real data. Choose another --out, or pass --force to replace it",
    )


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished cohort onto `out_dir`, the old one out of the way first."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        old.rmdir()
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- CLI ----------------------------------------------------------------------------------

def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="cohort folder (default: params paths.data)")
    parser.add_argument("--force", action="store_true", help="replace a folder that is not a synth cohort")


def run_cli(args: argparse.Namespace, params: Mapping[str, Any]) -> int:
    out = args.out or Path(params.get("paths", {}).get("data", "data"))
    manifest = synthesize_cohort(out, params, force=args.force)
    print(manifest)
    return 0
