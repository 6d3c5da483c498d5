"""Synthetic pneumonia lesions that follow the paper's four findings (Sec. III-B).

A class :class:`LesionProfile` says how many lesions a scan has, how much of the lung they take
(LVR), where they sit (subpleural or central) and how dense they are (ground-glass opacity,
consolidation). :func:`sample_burdens` draws the per-scan count and LVR for a whole class as a
*stratified* sample (each scan gets its own quantile stratum), so a cohort of 30 scans already
shows the population statistics; :func:`paint_lesions` then grows the lesions of one scan.

Each lesion is an irregular blob: the voxels of a random ellipsoid with the highest score
``(1 - r^2) + a * smooth_noise +/- depth_term`` (the depth term pulls subpleural lesions
against the pleura and central ones away from it), as many voxels as its volume asks for,
clipped to the lung, kept as one 26-connected component and never touching another lesion, so
that the analysis counts exactly the lesions painted here. Lesion voxels *replace* the
parenchyma HU; vessels are blended over them afterwards (they still pass through).

The classes overlap on purpose (single-lesion and consolidated COVID-19 scans, peripheral CAP
lesions, small-LVR COVID-19 scans): no single statistic separates them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepsc.data.synth_anatomy import Anatomy, ScanGeometry, smooth_noise

CONSOLIDATION_HU = (-10.0, 60.0)
MIN_LESION_VOLUME_MM3 = 400.0          # 0.4 ml, well above the analysis' few-voxel floor
ELLIPSOID_FILL = 0.6                   # expected share of the ellipsoid a blob fills


@dataclass(frozen=True)
class LesionProfile:
    """How one disease's lesions look (all volumes as fractions of the lung volume).

    Attributes:
        count_pmf: probability of 1, 2, ... lesions per scan.
        lvr_mean, lvr_shape: gamma distribution of the per-scan lesion volume ratio.
        size_concentration: Dirichlet concentration splitting a scan's lesion volume among its
            lesions (small = very unequal sizes).
        peripheral_prob, peripheral_concentration: mean and concentration of the beta
            distribution of a scan's probability that its lesions sit against the pleura.
        consolidation_prob, consolidation_fraction: probability that a lesion has a
            consolidated core, and the range of the core's share of the lesion.
        atypical_scan_prob, atypical_consolidation_prob: share of scans whose lesions follow
            the other disease's density pattern (organising COVID-19 pneumonia with
            consolidation, ground-glass-only CAP), with this consolidation probability.
        ggo_hu: range of a lesion's mean ground-glass HU.
        clustered: later lesions sit near the first one (one lobe) instead of anywhere.
        elongation_z: range of the cranio-caudal stretch of the lesion ellipsoid.
        inferior_bias: preference for the lung bases (0 = none).
    """

    name: str
    count_pmf: tuple[float, ...]
    lvr_mean: float
    lvr_shape: float
    size_concentration: float
    peripheral_prob: float
    peripheral_concentration: float
    consolidation_prob: float
    atypical_scan_prob: float
    atypical_consolidation_prob: float
    consolidation_fraction: tuple[float, float]
    ggo_hu: tuple[float, float]
    clustered: bool
    elongation_z: tuple[float, float]
    inferior_bias: float

    def __post_init__(self) -> None:
        pmf = np.asarray(self.count_pmf, dtype=float)
        if pmf.ndim != 1 or len(pmf) == 0 or np.any(pmf < 0) or abs(pmf.sum() - 1.0) > 1e-6:
            raise ValueError(f"{self.name}: count_pmf must be probabilities of 1, 2, ... lesions summing to 1")
        if not (0.0 < self.lvr_mean < 0.6) or min(self.lvr_shape, self.size_concentration, self.peripheral_concentration) <= 0:
            raise ValueError(f"{self.name}: lvr_mean must be in (0, 0.6); lvr_shape and the concentrations > 0")
        if not 0.0 < self.peripheral_prob < 1.0:
            raise ValueError(f"{self.name}: peripheral_prob must be in (0, 1)")
        for name in ("consolidation_prob", "atypical_scan_prob", "atypical_consolidation_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{self.name}: {name} must be a probability")


# Tuned (generator side only) until deepsc.data.analysis on the default cohort reproduces the
# paper's Sec. III-B numbers within 20 % (tests/test_analysis.py, slow acceptance test). The
# counts and LVR follow the paper directly; peripheral_prob, the depth pull in _grow_blob and the
# HU ranges were tuned against the measured PLR (sigma 15 mm) and HU band fractions.
COVID = LesionProfile(
    name="covid",
    count_pmf=(0.10, 0.15, 0.20, 0.12, 0.10, 0.09, 0.08, 0.07, 0.05, 0.04),
    lvr_mean=0.143,
    lvr_shape=2.5,
    size_concentration=0.7,
    peripheral_prob=0.88,
    peripheral_concentration=4.0,
    consolidation_prob=0.35,
    atypical_scan_prob=0.2,
    atypical_consolidation_prob=0.9,
    consolidation_fraction=(0.15, 0.5),
    ggo_hu=(-760.0, -610.0),
    clustered=False,
    elongation_z=(0.8, 1.6),
    inferior_bias=1.0,
)
CAP = LesionProfile(
    name="cap",
    count_pmf=(0.55, 0.25, 0.12, 0.05, 0.03),
    lvr_mean=0.044,
    lvr_shape=1.5,
    size_concentration=3.0,
    peripheral_prob=0.2,
    peripheral_concentration=4.0,
    consolidation_prob=0.9,
    atypical_scan_prob=0.15,
    atypical_consolidation_prob=0.1,
    consolidation_fraction=(0.35, 0.7),
    ggo_hu=(-740.0, -600.0),
    clustered=True,
    elongation_z=(1.5, 2.1),
    inferior_bias=0.3,
)
PROFILES = {"covid": COVID, "cap": CAP}


GOLDEN_FRACTION = 0.6180339887498949   # low-discrepancy step between a scan's lesions


@dataclass(frozen=True)
class LesionBurden:
    """What one scan gets: lesion count, target lesion volume ratio (lesion / lung volume),
    the probability that its lesions are subpleural, a phase in [0, 1) that spreads that
    probability evenly over its lesions, and whether it has the atypical density pattern."""

    count: int
    lvr: float
    peripheral_propensity: float = 0.5
    phase: float = 0.0
    atypical: bool = False

    def is_peripheral(self, lesion_index: int) -> bool:
        """Lesion k is subpleural when (phase + k * 0.618...) mod 1 < propensity, so a scan of
        n lesions has about propensity * n subpleural ones (not a binomial draw)."""
        return (self.phase + lesion_index * GOLDEN_FRACTION) % 1.0 < self.peripheral_propensity


def sample_burdens(rng: np.random.Generator, profile: LesionProfile, n: int, rank_correlation: float = 0.5) -> list[LesionBurden]:
    """Stratified per-scan burdens for `n` scans of one class.

    Every per-scan quantity is a stratified sample (scan i gets quantile (rank_i + U) / n of
    its distribution), so 30 scans already reproduce the class statistics without the spread
    of independent draws: count (``count_pmf``), LVR (gamma), peripheral propensity (beta with
    mean ``peripheral_prob`` and concentration ``peripheral_concentration``), phase (uniform)
    and the atypical flag. The count and LVR ranks are correlated (`rank_correlation` of the
    underlying normals): scans with many lesions tend to have a larger LVR.
    """
    from scipy import stats

    if n <= 0:
        return []
    cov = np.eye(5)
    cov[0, 1] = cov[1, 0] = rank_correlation
    latent = rng.multivariate_normal(np.zeros(5), cov, size=n)
    quantiles = (np.argsort(np.argsort(latent, axis=0), axis=0) + rng.uniform(size=(n, 5))) / n
    cdf = np.cumsum(profile.count_pmf)
    counts = np.minimum(np.searchsorted(cdf, quantiles[:, 0], side="right"), len(cdf) - 1) + 1
    lvrs = stats.gamma.ppf(quantiles[:, 1], profile.lvr_shape, scale=profile.lvr_mean / profile.lvr_shape)
    a = profile.peripheral_prob * profile.peripheral_concentration
    b = (1.0 - profile.peripheral_prob) * profile.peripheral_concentration
    propensity = stats.beta.ppf(quantiles[:, 2], a, b)
    return [
        LesionBurden(int(c), float(min(v, 0.55)), float(p), float(phase), bool(u < profile.atypical_scan_prob))
        for c, v, p, phase, u in zip(counts, lvrs, propensity, quantiles[:, 3], quantiles[:, 4])
    ]


@dataclass(frozen=True)
class PaintedLesion:
    """One lesion as painted: centre (voxel index), voxels, subpleural or central seat."""

    centre: tuple[int, int, int]
    voxels: int
    peripheral: bool
    consolidated: bool


def paint_lesions(
    rng: np.random.Generator,
    geometry: ScanGeometry,
    anatomy: Anatomy,
    hu: np.ndarray,
    burden: LesionBurden,
    profile: LesionProfile,
) -> tuple[np.ndarray, list[PaintedLesion]]:
    """Grow `burden.count` lesions in the lungs of `anatomy` and write their HU into `hu`.

    Args:
        hu: ``(Z, Y, X)`` float32 image, modified in place inside the lesions.
    Returns:
        ``(Z, Y, X)`` uint8 lesion mask (inside the lung; empty when no lesion fits) and the
        painted lesions, largest first. Fewer than `burden.count` lesions are painted only when
        the lungs are full.
    """
    from scipy import ndimage

    lung = anatomy.lung
    lesion = np.zeros(geometry.shape, dtype=np.uint8)
    if burden.count <= 0 or not lung.any():
        return lesion, []
    depth = _depth_mm(lung, geometry.spacing)
    lung_mm3 = float(lung.sum()) * geometry.voxel_volume_mm3
    shares = rng.dirichlet(np.full(burden.count, profile.size_concentration))
    volumes = np.sort(np.maximum(shares * burden.lvr * lung_mm3, MIN_LESION_VOLUME_MM3))[::-1]
    available = lung.copy()
    consolidation_prob = profile.atypical_consolidation_prob if burden.atypical else profile.consolidation_prob
    painted: list[PaintedLesion] = []
    for index, volume in enumerate(volumes):
        peripheral = burden.is_peripheral(index)
        anchor = painted[0].centre if (profile.clustered and painted) else None
        centre = _choose_centre(rng, geometry, available, depth, peripheral, profile, anchor)
        if centre is None:
            break
        box, blob, score = _grow_blob(rng, geometry, available, depth, centre, volume, peripheral, profile)
        if blob is None:
            continue
        consolidated = bool(rng.random() < consolidation_prob)
        hu[box][blob] = _lesion_hu(rng, geometry, score, blob, profile, consolidated)
        lesion[box][blob] = 1
        available[box] &= ~ndimage.binary_dilation(blob, structure=np.ones((3, 3, 3), bool))
        painted.append(PaintedLesion(tuple(int(c) for c in centre), int(blob.sum()), peripheral, consolidated))
    return lesion, painted


def _depth_mm(lung: np.ndarray, spacing) -> np.ndarray:
    """3D distance (mm) of each lung voxel to the nearest non-lung voxel; 0 outside the lung."""
    from scipy import ndimage

    found = ndimage.find_objects(lung.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in found)
    depth = np.zeros(lung.shape, dtype=np.float32)
    depth[box] = ndimage.distance_transform_edt(lung[box], sampling=spacing)
    return depth


def _choose_centre(rng, geometry: ScanGeometry, available, depth, peripheral: bool, profile: LesionProfile, anchor):
    """A lesion seat: subpleural (depth of a few mm) or central (deep), biased to the bases."""
    index = np.flatnonzero(available)
    if len(index) == 0:
        return None
    d = depth.ravel()[index]
    weight = np.exp(-d / 6.0) if peripheral else np.exp((d - float(d.max())) / 6.0)
    zyx = np.stack(np.unravel_index(index, geometry.shape), axis=1)
    height = zyx[:, 0] / max(geometry.shape[0] - 1, 1)
    weight = weight * np.exp(-profile.inferior_bias * height)
    if anchor is not None:
        offset_mm = (zyx - np.asarray(anchor)) * np.asarray(geometry.spacing)
        weight = weight * np.exp(-(offset_mm**2).sum(axis=1) / (2 * 35.0**2))
    total = float(weight.sum())
    if not np.isfinite(total) or total <= 0:
        return None
    return zyx[rng.choice(len(index), p=weight / total)]


def _grow_blob(rng, geometry: ScanGeometry, available, depth, centre, volume_mm3: float, peripheral: bool, profile: LesionProfile):
    """The `volume_mm3` best-scoring free lung voxels of a noisy ellipsoid at `centre`."""
    from scipy import ndimage

    spacing = np.asarray(geometry.spacing)
    radius = (3.0 * volume_mm3 / (4.0 * np.pi * ELLIPSOID_FILL)) ** (1.0 / 3.0)
    stretch = np.array([rng.uniform(*profile.elongation_z), np.exp(rng.normal(0, 0.2)), np.exp(rng.normal(0, 0.2))])
    semi = radius * stretch / np.prod(stretch) ** (1.0 / 3.0)
    half = np.ceil(1.5 * semi / spacing).astype(int) + 1
    lo = np.maximum(np.asarray(centre) - half, 0)
    hi = np.minimum(np.asarray(centre) + half + 1, geometry.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grids = np.ogrid[box]
    r2 = sum(((g - c) * s / a) ** 2 for g, c, s, a in zip(grids, centre, spacing, semi))
    noise = smooth_noise(rng, tuple(hi - lo), geometry.spacing, max(5.0, 0.5 * radius))
    depth_term = depth[box] / radius
    score = (1.0 - r2) + 0.45 * noise + (-1.2 * depth_term if peripheral else 2.0 * depth_term)
    candidate = available[box] & (r2 < 2.0)
    wanted = max(1, int(round(volume_mm3 / geometry.voxel_volume_mm3)))
    if candidate.sum() == 0:
        return box, None, score
    if candidate.sum() > wanted:
        threshold = np.partition(score[candidate], -wanted)[-wanted]
        candidate &= score >= threshold
    labels, n = ndimage.label(candidate, structure=np.ones((3, 3, 3), bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        candidate = labels == (int(np.argmax(sizes)) + 1)
    return box, candidate, score


def _lesion_hu(rng, geometry: ScanGeometry, score, blob, profile: LesionProfile, consolidated: bool) -> np.ndarray:
    """HU of the blob's voxels: textured ground glass, with a consolidated core if asked."""
    ggo = rng.uniform(*profile.ggo_hu) + 45.0 * smooth_noise(rng, blob.shape, geometry.spacing, 4.0)
    if not consolidated:
        return ggo[blob]
    share = rng.uniform(*profile.consolidation_fraction)
    cut = np.quantile(score[blob], 1.0 - share)
    core = 1.0 / (1.0 + np.exp(-(score - cut) / 0.05))
    dense = rng.uniform(*CONSOLIDATION_HU) + 20.0 * smooth_noise(rng, blob.shape, geometry.spacing, 4.0)
    return (ggo + (dense - ggo) * core)[blob]
