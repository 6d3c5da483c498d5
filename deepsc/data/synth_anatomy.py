"""Synthetic chest-CT anatomy: body, chest wall, ribs, spine, mediastinum, lungs, airways, vessels.

Everything is built in millimetres on the canonical ``(Z, Y, X)`` LPS grid of
:mod:`deepsc.data.volume` (x -> patient left, y -> posterior, z -> superior, ``z = 0`` the most
inferior slice), so the same code serves the 128 x 128 default and the 512 x 512 ``paper``
profile. The lesion generator (:mod:`deepsc.data.synth_lesions`) paints into the lungs built
here; :mod:`deepsc.data.synth` composes the two and writes the files.

Hounsfield values used (non-contrast CT): air -1000, fat -100, soft tissue / blood 40,
bone 400-1000, lung parenchyma about -850 (denser posteriorly), vessels 40.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
VESSEL_HU = 40.0
PARENCHYMA_HU = -850.0

# Lung height (apex to the deepest costophrenic recess) and the margins of the scan around it.
LUNG_HEIGHT_MM = (200.0, 280.0)
INFERIOR_MARGIN_MM = (25.0, 45.0)
SUPERIOR_MARGIN_MM = (15.0, 30.0)


@dataclass(frozen=True)
class ScanGeometry:
    """Voxel grid of one synthetic scan.

    Args:
        shape: ``(Z, Y, X)`` voxels.
        spacing: ``(sz, sy, sx)`` in mm.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive voxel counts, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive mm values, got {self.spacing}")

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinates in mm: z ``(Z,1,1)`` from the inferior edge; y ``(1,Y,1)``
        and x ``(1,1,X)`` centred on the field of view."""
        (nz, ny, nx), (sz, sy, sx) = self.shape, self.spacing
        z = (np.arange(nz, dtype=np.float32) * sz).reshape(-1, 1, 1)
        y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy).reshape(1, -1, 1)
        x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx).reshape(1, 1, -1)
        return z, y, x

    def box_axes_mm(self, lo, hi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`axes_mm` (float64) for the voxel box ``[lo, hi)`` only."""
        (_, ny, nx), (sz, sy, sx) = self.shape, self.spacing
        z = (np.arange(lo[0], hi[0]) * sz).reshape(-1, 1, 1)
        y = ((np.arange(lo[1], hi[1]) - (ny - 1) / 2) * sy).reshape(1, -1, 1)
        x = ((np.arange(lo[2], hi[2]) - (nx - 1) / 2) * sx).reshape(1, 1, -1)
        return z, y, x

    def to_index(self, point_mm: np.ndarray) -> np.ndarray:
        """``(z, y, x)`` mm (as in :meth:`axes_mm`) -> fractional voxel index."""
        (nz, ny, nx), spacing = self.shape, np.asarray(self.spacing)
        centre = np.array([0.0, (ny - 1) / 2, (nx - 1) / 2])
        return np.asarray(point_mm, dtype=np.float64) / spacing + centre

    def to_mm(self, index: np.ndarray) -> np.ndarray:
        (nz, ny, nx), spacing = self.shape, np.asarray(self.spacing)
        centre = np.array([0.0, (ny - 1) / 2, (nx - 1) / 2])
        return (np.asarray(index, dtype=np.float64) - centre) * spacing


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...], correlation_mm: float) -> np.ndarray:
    """Zero-mean, unit-std random field with about `correlation_mm` correlation length.

    Drawn on a coarse grid (step = correlation / 2) and linearly upsampled, so the cost does not
    grow with resolution and the field looks the same at 3 mm and at 0.7 mm voxels.
    Returns float32 of `shape`.
    """
    from scipy import ndimage

    step = correlation_mm / 2.0
    coarse_shape = [max(2, int(np.ceil(n * s / step)) + 2) for n, s in zip(shape, spacing)]
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 1.0, mode="wrap")
    field = coarse
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        position = np.arange(n, dtype=np.float32) * (s / step) + 0.5
        lower = np.minimum(position.astype(np.int64), coarse_shape[axis] - 2)
        weight = (position - lower).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        field = field.take(lower, axis=axis) * (1 - weight) + field.take(lower + 1, axis=axis) * weight
    field -= field.mean()
    return (field / max(float(field.std()), 1e-6)).astype(np.float32)


@dataclass(frozen=True)
class AnatomyParams:
    """Per-case anatomical shape parameters (mm), drawn by :func:`sample_anatomy`."""

    body_half_width: float
    body_half_depth: float
    body_centre_xy: tuple[float, float]
    fat_thickness: float
    lung_height: float
    inferior_margin: float
    superior_margin: float
    mediastinum_half_width: float
    lung_depth_scale: float
    dome_height: tuple[float, float]   # (right, left)
    right_lung_shorter: float

    @property
    def scan_height(self) -> float:
        return self.inferior_margin + self.lung_height + self.superior_margin


def sample_anatomy(rng: np.random.Generator, field_of_view_mm: float) -> AnatomyParams:
    """Draw one patient's build so that the body fits `field_of_view_mm` (in-plane width)."""
    half_width = min(rng.uniform(140.0, 172.0), 0.46 * field_of_view_mm)
    return AnatomyParams(
        body_half_width=half_width,
        body_half_depth=half_width * rng.uniform(0.62, 0.72),
        body_centre_xy=(rng.uniform(-8.0, 8.0), rng.uniform(-14.0, 2.0)),
        fat_thickness=rng.uniform(6.0, 20.0),
        lung_height=rng.uniform(*LUNG_HEIGHT_MM),
        inferior_margin=rng.uniform(*INFERIOR_MARGIN_MM),
        superior_margin=rng.uniform(*SUPERIOR_MARGIN_MM),
        mediastinum_half_width=rng.uniform(14.0, 24.0),
        lung_depth_scale=rng.uniform(0.80, 0.86),
        dome_height=(rng.uniform(40.0, 60.0), rng.uniform(30.0, 50.0)),
        right_lung_shorter=rng.uniform(0.0, 12.0),
    )


def slices_needed(anatomy: AnatomyParams, slice_spacing_mm: float) -> int:
    """Slice count that holds the lungs plus the inferior and superior margins."""
    return int(np.ceil(anatomy.scan_height / slice_spacing_mm))


@dataclass
class Anatomy:
    """One synthetic chest without lesions.

    Attributes:
        hu: ``(Z, Y, X)`` float32 HU, noise-free, vessels not yet drawn.
        lung: ``(Z, Y, X)`` bool, both lungs (trachea and main bronchi excluded).
        side: ``(Z, Y, X)`` int8, 1 right lung, 2 left lung, 0 elsewhere.
        vessels: ``(Z, Y, X)`` float32 in [0, 1], the vessel fraction of each voxel.
        airway: ``(Z, Y, X)`` bool, trachea and main-bronchus lumen (air).
        hila: ``(2, 3)`` mm (z, y, x) of the right and left hilum.
    """

    hu: np.ndarray
    lung: np.ndarray
    side: np.ndarray
    vessels: np.ndarray
    airway: np.ndarray
    hila: np.ndarray
    params: AnatomyParams


def build_anatomy(rng: np.random.Generator, geometry: ScanGeometry, anatomy: AnatomyParams) -> Anatomy:
    """Render the chest of `anatomy` on `geometry` (see the module docstring for the HU)."""
    z, y, x = geometry.axes_mm()
    cx, cy = anatomy.body_centre_xy
    xb, yb = x - cx, y - cy
    rho = np.sqrt((xb / anatomy.body_half_width) ** 2 + (yb / anatomy.body_half_depth) ** 2)  # (1, Y, X)
    shape = geometry.shape
    hu = np.full(shape, AIR_HU, dtype=np.float32)
    _draw_table(hu, y, cy + anatomy.body_half_depth)
    body = np.broadcast_to(rho <= 1.0, shape)
    inner = rho <= 1.0 - anatomy.fat_thickness / anatomy.body_half_depth
    hu[body] = FAT_HU
    soft = SOFT_TISSUE_HU + 8.0 * smooth_noise(rng, shape, geometry.spacing, 12.0)
    np.copyto(hu, soft, where=np.broadcast_to(inner, shape))

    z_base = anatomy.inferior_margin
    spine_y = cy + anatomy.body_half_depth * 0.55
    _draw_spine(hu, rng, z, y, x, centre_xy=(cx, spine_y), body_depth=anatomy.body_half_depth)
    _draw_ribs(hu, rng, z, rho, xb, yb, anatomy)
    _draw_sternum(hu, z, y, x, cx, cy - anatomy.body_half_depth * 0.82, z_base, anatomy.lung_height)

    lung, side = _lung_masks(geometry, anatomy, rho, spine_y)
    parenchyma = _parenchyma_hu(rng, geometry, y, cy, anatomy.body_half_depth)
    np.copyto(hu, parenchyma, where=lung)
    _draw_abdomen(hu, z, y, x, anatomy)

    airway, airway_wall, hila = _airways(geometry, anatomy, z, y, x, cy)
    lung &= ~airway_wall
    hu[airway_wall & ~lung] = SOFT_TISSUE_HU
    side[~lung] = 0
    vessels = _vessel_tree(rng, geometry, side, hila)
    return Anatomy(hu=hu, lung=lung, side=side, vessels=vessels, airway=airway, hila=hila, params=anatomy)


def finish_image(hu: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Blend the vessel tree over the lungs (lesions included) and open the airways. In place."""
    inside = anatomy.lung & (anatomy.vessels > 0)
    fraction = anatomy.vessels[inside]
    hu[inside] = hu[inside] * (1.0 - fraction) + VESSEL_HU * fraction
    hu[anatomy.airway] = AIR_HU
    return hu


# --- parts of the body --------------------------------------------------------------------

def _draw_table(hu: np.ndarray, y: np.ndarray, body_back_y: float) -> None:
    """Two thin carbon-fibre plates under the patient, across the whole scan."""
    y1 = y[0, :, 0]
    for offset, value in ((8.0, 150.0), (30.0, 150.0)):
        rows = np.abs(y1 - (body_back_y + offset)) <= 2.0
        hu[:, rows, :] = value


def _draw_spine(hu: np.ndarray, rng: np.random.Generator, z, y, x, centre_xy, body_depth: float) -> None:
    """Vertebral bodies (cancellous bone with intervertebral discs), canal and posterior arch."""
    sx, sy = centre_xy
    radius = body_depth * 0.17
    r2 = ((x - sx) ** 2 + (y - sy) ** 2) / radius**2
    phase = np.mod(z + rng.uniform(0.0, 28.0), 28.0)
    inside = np.broadcast_to(r2 <= 1.0, hu.shape)
    value = np.where(phase >= 23.0, np.float32(80.0), np.where(r2 > 0.7, np.float32(750.0), np.float32(420.0)))
    hu[inside] = np.broadcast_to(value, hu.shape)[inside]
    canal_y = sy + radius * 1.7
    arch = ((x - sx) / (radius * 1.4)) ** 2 + ((y - canal_y) / (radius * 0.95)) ** 2 <= 1.0
    canal = ((x - sx) / (radius * 0.55)) ** 2 + ((y - canal_y) / (radius * 0.5)) ** 2 <= 1.0
    hu[np.broadcast_to(arch & ~canal, hu.shape)] = 650.0
    hu[np.broadcast_to(canal, hu.shape)] = 20.0


def _draw_ribs(hu: np.ndarray, rng: np.random.Generator, z, rho, xb, yb, anatomy: AnatomyParams) -> None:
    """Ribs: bands in the chest wall that slope down from the spine toward the front."""
    inner = 1.0 - (anatomy.fat_thickness + 12.0) / anatomy.body_half_depth
    shell = (rho >= inner - 0.045) & (rho <= inner)
    angle = np.abs(np.arctan2(xb, yb))          # 0 at the spine (posterior), pi at the sternum
    pitch, thickness = 26.0, 9.0
    phase = np.mod(z + 32.0 * angle + rng.uniform(0.0, pitch), pitch)
    top = anatomy.inferior_margin + anatomy.lung_height + 10.0
    rib = shell & (angle > 0.35) & (angle < 2.45) & (phase < thickness) & (z > anatomy.inferior_margin - 5.0) & (z < top)
    cortex = rib & ((phase < 1.8) | (phase > thickness - 1.8))
    hu[rib] = 420.0
    hu[cortex] = 900.0


def _draw_sternum(hu: np.ndarray, z, y, x, cx: float, sternum_y: float, z_base: float, lung_height: float) -> None:
    band = (np.abs(x - cx) <= 14.0) & (np.abs(y - sternum_y) <= 5.0)
    span = (z > z_base + 0.25 * lung_height) & (z < z_base + 0.95 * lung_height)
    hu[band & span] = 450.0


def _lung_masks(geometry: ScanGeometry, anatomy: AnatomyParams, rho, spine_y: float) -> tuple[np.ndarray, np.ndarray]:
    """Both lungs: in the chest wall, above the diaphragm domes, around the mediastinum and heart.

    In-plane each lung is the part of the thorax on its side of the mediastinum; its outline
    shrinks toward the apex (an ellipsoidal cap above 40 % of the height), the base is carved by
    the diaphragm dome (highest at the centre of the hemithorax, lowest in the costophrenic
    recesses), and the heart indents the left lung.
    """
    z, y, x = geometry.axes_mm()
    cx, cy = anatomy.body_centre_xy
    half_w, half_d = anatomy.body_half_width, anatomy.body_half_depth
    z_base = anatomy.inferior_margin
    thorax = rho <= anatomy.lung_depth_scale - anatomy.fat_thickness / half_d * 0.5
    lung = np.zeros(geometry.shape, dtype=bool)
    side = np.zeros(geometry.shape, dtype=np.int8)
    for index, sign in enumerate((-1.0, 1.0)):          # right lung at x < 0, left at x > 0
        height = anatomy.lung_height - (anatomy.right_lung_shorter if sign < 0 else 0.0)
        t = (z - z_base) / height                                   # 0 base .. 1 apex
        cap = np.sqrt(np.clip(1.0 - ((t - 0.4) / 0.6) ** 2, 0.0, 1.0))
        scale = np.where(t <= 0.4, 1.0, cap)                        # (Z, 1, 1)
        centre_x = cx + sign * (anatomy.mediastinum_half_width + half_w * 0.42)
        centre_y = cy + half_d * 0.05
        semi_x = half_w * 0.45 * np.maximum(scale, 1e-3)
        semi_y = half_d * 0.80 * np.maximum(scale, 1e-3)
        outline = ((x - centre_x) / semi_x) ** 2 + ((y - centre_y) / semi_y) ** 2 <= 1.0
        medial = sign * (x - cx) >= anatomy.mediastinum_half_width
        dome_r2 = ((x - centre_x) / (half_w * 0.40)) ** 2 + ((y - centre_y) / (half_d * 0.70)) ** 2
        floor = z_base + anatomy.dome_height[index] * np.clip(1.0 - dome_r2, 0.0, 1.0)
        one = outline & thorax & medial & (z >= floor) & (t <= 1.0)
        lung |= one
        side[one] = index + 1
    heart = _heart(z, y, x, anatomy)
    spine_keepout = (x - cx) ** 2 + (y - spine_y) ** 2 <= (half_d * 0.17 + 10.0) ** 2
    aorta = _aorta(z, y, x, anatomy, spine_y)
    carve = heart | np.broadcast_to(spine_keepout, geometry.shape) | aorta
    lung &= ~carve
    side[carve] = 0
    return lung, side


def _heart(z, y, x, anatomy: AnatomyParams) -> np.ndarray:
    cx, cy = anatomy.body_centre_xy
    centre = (anatomy.inferior_margin + anatomy.dome_height[1] + 30.0, cy - anatomy.body_half_depth * 0.25, cx + 18.0)
    semi = (55.0, anatomy.body_half_depth * 0.45, anatomy.body_half_width * 0.36)
    return ((z - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((x - centre[2]) / semi[2]) ** 2 <= 1.0


def _aorta(z, y, x, anatomy: AnatomyParams, spine_y: float) -> np.ndarray:
    """Descending aorta, left-anterior of the spine, up to the arch."""
    cx, _ = anatomy.body_centre_xy
    top = anatomy.inferior_margin + anatomy.lung_height * 0.78
    tube = (x - (cx + 24.0)) ** 2 + (y - (spine_y - 26.0)) ** 2 <= 13.0**2
    return tube & (z <= top)


def _parenchyma_hu(rng: np.random.Generator, geometry: ScanGeometry, y, cy: float, half_depth: float) -> np.ndarray:
    """About -850 HU with a posterior (dependent) density gradient and soft texture."""
    gradient = 35.0 * np.clip((y - cy) / half_depth, -1.0, 1.0)
    texture = 12.0 * smooth_noise(rng, geometry.shape, geometry.spacing, 6.0)
    return (PARENCHYMA_HU + gradient + texture).astype(np.float32)


def _draw_abdomen(hu: np.ndarray, z, y, x, anatomy: AnatomyParams) -> None:
    """A small gastric air bubble under the left dome (a classic trap for threshold lung masks)."""
    cx, cy = anatomy.body_centre_xy
    top = anatomy.inferior_margin + anatomy.dome_height[1] - 14.0
    bubble = ((z - top) / 10.0) ** 2 + ((y - (cy - 10.0)) / 18.0) ** 2 + ((x - (cx + 55.0)) / 22.0) ** 2 <= 1.0
    hu[bubble & (z <= top)] = AIR_HU


AIRWAY_WALL_MM = 2.5


def _airways(geometry: ScanGeometry, anatomy: AnatomyParams, z, y, x, cy: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trachea from the top of the scan to the carina, and the two main bronchi to the hila.

    Returns the lumen (air), the lumen plus its wall (kept out of the lung mask, as the
    lungmask R231 convention excludes trachea and main bronchi) and the hila (mm).
    """
    cx = anatomy.body_centre_xy[0]
    z_base = anatomy.inferior_margin
    carina = np.array([z_base + 0.62 * anatomy.lung_height, cy - 0.12 * anatomy.body_half_depth, cx])
    hila = np.array(
        [
            [carina[0] - 22.0, cy + 0.02 * anatomy.body_half_depth, cx - anatomy.mediastinum_half_width - 22.0],
            [carina[0] - 30.0, cy + 0.02 * anatomy.body_half_depth, cx + anatomy.mediastinum_half_width + 22.0],
        ]
    )
    masks = []
    for radius in (8.5, 6.0), (8.5 + AIRWAY_WALL_MM, 6.0 + AIRWAY_WALL_MM):
        trachea = ((x - carina[2]) ** 2 + (y - carina[1]) ** 2 <= radius[0] ** 2) & (z >= carina[0])
        mask = np.broadcast_to(trachea, geometry.shape).copy()
        for hilum in hila:
            _paint_segment(mask, geometry, carina, hilum, radius[1])
        masks.append(mask)
    return masks[0], masks[1], hila


def _paint_segment(mask: np.ndarray, geometry: ScanGeometry, start_mm, end_mm, radius_mm: float) -> None:
    """Set the voxels within `radius_mm` of the segment start-end (mm) to True."""
    box, distance = _segment_distance(geometry, np.asarray(start_mm), np.asarray(end_mm), radius_mm)
    if box is not None:
        mask[box] |= distance <= radius_mm


def _segment_distance(geometry: ScanGeometry, start: np.ndarray, end: np.ndarray, reach_mm: float):
    """Distance (mm) of every voxel of the segment's bounding box (+ reach) to the segment."""
    spacing = np.asarray(geometry.spacing)
    lo = np.floor(geometry.to_index(np.minimum(start, end) - reach_mm - spacing)).astype(int)
    hi = np.ceil(geometry.to_index(np.maximum(start, end) + reach_mm + spacing)).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, geometry.shape)
    if np.any(hi <= lo):
        return None, None
    zz, yy, xx = geometry.box_axes_mm(lo, hi)
    direction = end - start
    length2 = max(float(direction @ direction), 1e-9)
    t = ((zz - start[0]) * direction[0] + (yy - start[1]) * direction[1] + (xx - start[2]) * direction[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    distance = np.sqrt((zz - start[0] - t * direction[0]) ** 2 + (yy - start[1] - t * direction[1]) ** 2 + (xx - start[2] - t * direction[2]) ** 2)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), distance


# --- vessel tree --------------------------------------------------------------------------

VESSEL_ROOT_RADIUS_MM = 5.5
VESSEL_MIN_RADIUS_MM = 0.7
VESSEL_TRUNKS_PER_LUNG = 8


def _vessel_tree(rng: np.random.Generator, geometry: ScanGeometry, side: np.ndarray, hila: np.ndarray) -> np.ndarray:
    """Branching pulmonary vessels from each hilum, thinning toward the periphery.

    Each trunk aims at a random point of its lung; every branch splits in two children that
    are 0.78 x as thick and 0.72 x as long and turn 15-35 degrees off the parent's direction.
    Returns the vessel fraction of each voxel (partial volume at the tube walls), zero outside
    the lungs. A branch whose end leaves the lung stops splitting.
    """
    fraction = np.zeros(geometry.shape, dtype=np.float32)
    voxel = float(min(geometry.spacing[1:]))
    step = np.array([max(1, side.shape[0] // 40), 4, 4])
    coarse = side[:: step[0], :: step[1], :: step[2]]
    for index, hilum in enumerate(hila):
        targets = geometry.to_mm(np.argwhere(coarse == index + 1) * step)
        if len(targets) == 0:
            continue
        chosen = rng.choice(len(targets), min(VESSEL_TRUNKS_PER_LUNG, len(targets)), replace=False)
        for target in targets[chosen]:
            direction = target - hilum
            length = float(np.linalg.norm(direction))
            if length > 1e-3:
                _grow_branch(rng, geometry, fraction, side, hilum, direction / length, 0.35 * length, VESSEL_ROOT_RADIUS_MM, voxel)
    fraction[side == 0] = 0.0
    return fraction


def _grow_branch(rng, geometry, fraction, side, start, direction, length, radius, voxel) -> None:
    stack = [(start, direction, length, radius)]
    while stack:
        start, direction, length, radius = stack.pop()
        end = start + direction * length
        box, distance = _segment_distance(geometry, start, end, radius + voxel)
        if box is not None:
            np.maximum(fraction[box], np.clip((radius - distance) / voxel + 0.5, 0.0, 1.0), out=fraction[box])
        child_radius, child_length = radius * 0.78, length * 0.72
        # thinner than VESSEL_MIN_RADIUS_MM or shorter than 1.5 voxels adds nothing visible
        if child_radius < VESSEL_MIN_RADIUS_MM or child_length < 1.5 * voxel or not _inside(side, geometry, end):
            continue
        for _ in range(2):
            stack.append((end, _turn(rng, direction, np.deg2rad(rng.uniform(15.0, 35.0))), child_length, child_radius))


def _inside(side: np.ndarray, geometry: ScanGeometry, point_mm: np.ndarray) -> bool:
    """Whether `point_mm` falls in a lung (branches that leave the lung stop growing)."""
    index = np.rint(geometry.to_index(point_mm)).astype(int)
    if np.any(index < 0) or np.any(index >= geometry.shape):
        return False
    return bool(side[tuple(index)])


def _turn(rng: np.random.Generator, direction: np.ndarray, angle: float) -> np.ndarray:
    """`direction` rotated by `angle` about a random axis perpendicular to it."""
    helper = rng.standard_normal(3)
    axis = helper - (helper @ direction) * direction
    axis /= max(np.linalg.norm(axis), 1e-9)
    return np.cos(angle) * direction + np.sin(angle) * axis
