"""Training and evaluation samples read from the preprocessed cohort (``outputs/preprocessed``).

A sample is ONE SCAN (the cross-stitch needs the patch's position in its own scan):

* training mode - ``cls`` ``(1, N, Hc, Wc)`` float32 (the N equidistant slices, values in
  [0, 1]), one patch ``(1, pd, ph, pw)`` float32 of ``image.npy``, its normalised box
  ``(6,)`` float32 ``(z0, y0, x0, z1, y1, x1) / (Z, Y, X)``, the patch's lesion mask ``lesion``
  ``(1, pd, ph, pw)`` float32 in {0, 1} (zeros when ``has_mask`` is False), ``has_mask`` (bool; False = the lesion mask is
  unknown and the segmentation loss must skip the scan), ``label`` (int64 class index,
  ``deepsc.CLASSES`` order) and ``case_id``. The patch is lesion-biased: with probability
  ``lesion_patch_prob`` it holds lesion voxels (when the scan has any), otherwise it is drawn
  anywhere. ``patch_sampling`` says where patches may start: ``grid`` draws among the tiles of
  the non-overlapping grid (a scan then offers only its few tiles, e.g. 8); ``random`` draws
  any start from 0 to the last tile's start per axis (nnU-Net's random crops; a lesion patch
  is placed at a random offset around one random lesion voxel). The draw depends only on
  (seed, epoch, index), so it is the same in every worker, process and after a resume. ``lesion_cls``
  ``(1, N, Hc, Wc)`` float32 is the scan's lesion map on the classification grid (the reference
  mask, or the ``lesion_context`` map given to the dataset), averaged over each cell's share of
  the scan by :func:`lesion_on_cls_grid`, and ``context_known`` (bool) says whether it is known.
* evaluation mode - the whole scan: ``cls``, ``image`` ``(1, Z, Y, X)`` float32, ``lesion``
  ``(1, Z, Y, X)`` float32 (zeros when ``has_mask`` is False), ``has_mask``, ``label``,
  ``case_id``. Scans differ in shape, so evaluation uses batch size 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from deepsc import CLASSES
from deepsc.errors import ConfigError, InputError

Triple = tuple[int, int, int]
MODES = ("train", "eval")
PATCH_SAMPLING = ("grid", "random")
SUBSETS = ("train", "test")


@dataclass(frozen=True)
class CaseRecord:
    """One preprocessed scan: where its arrays are and its patch grid.

    ``starts`` are the patch start voxels ``(z, y, x)`` of the non-overlapping grid over
    ``shape`` = ``image.npy``'s ``(Z, Y, X)``; ``lesion_voxels`` counts lesion voxels per patch
    (all 0 when the mask is unknown or the scan has no lesion).
    """

    case_id: str
    label_index: int
    has_mask: bool
    case_dir: Path
    shape: Triple
    patch_size: Triple
    starts: tuple[Triple, ...]
    lesion_voxels: tuple[int, ...]

    @property
    def lesion_patches(self) -> tuple[int, ...]:
        """Indices of the patches that hold at least one lesion voxel."""
        return tuple(i for i, count in enumerate(self.lesion_voxels) if count > 0)


def read_cohort(
    preprocessed: Path,
    split: Path,
    subset: str = "train",
    folds: Sequence[int] | None = None,
) -> list[CaseRecord]:
    """Records of the scans in ``subset`` of the split (optionally only the given CV folds).

    Raises:
        InputError: a split case missing from the preprocessed index, or a broken case folder.
        ConfigError: an unknown subset, or a selection without any scan.
    """
    if subset not in SUBSETS:
        raise ConfigError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    preprocessed, split = Path(preprocessed), Path(split)
    index = _read_csv(preprocessed / "index.csv", ("case_id", "label", "label_index", "has_mask", "case_dir"))
    split_frame = _read_csv(split, ("case_id", "label", "subset", "fold"))
    chosen = split_frame[split_frame["subset"] == subset]
    if folds is not None:
        chosen = chosen[chosen["fold"].isin(list(folds))]
    if chosen.empty:
        raise ConfigError(f"{split} selects no scan for subset={subset!r}, folds={folds!r}")
    index = index.set_index("case_id", drop=False)
    missing = [c for c in chosen["case_id"] if c not in index.index]
    if missing:
        raise InputError(missing[0], f"listed in {split} but not in {preprocessed / 'index.csv'} ({len(missing)} such scans); re-run preprocess")
    rows = index.loc[list(chosen["case_id"])]
    return [_case_record(row, preprocessed) for row in rows.itertuples(index=False)]


def class_counts(records: Sequence[CaseRecord]) -> list[int]:
    """Scans per class in ``deepsc.CLASSES`` order (for the inverse-frequency CE weights)."""
    counts = [0] * len(CLASSES)
    for record in records:
        counts[record.label_index] += 1
    return counts


class ScanDataset:
    """``torch.utils.data.Dataset`` of whole scans (see the module docstring for the items).

    Args:
        records: scans from :func:`read_cohort`.
        mode: ``train`` (one lesion-biased patch per scan) or ``eval`` (whole scans).
        lesion_patch_prob: probability in [0, 1] of drawing a patch that holds lesion voxels.
        seed: seed of the patch draws.
        patch_sampling: ``grid`` (tiles of the non-overlapping grid) or ``random`` (any start
            up to the last tile's, see the module docstring).
        flip_prob: probability of mirroring a training scan left-right (:func:`mirror_left_right`).
        lesion_context: optional ``{case_id: (N, Hc, Wc) float32}`` lesion maps on the
            classification grid that replace the reference mask as ``lesion_cls`` (e.g. a
            segmentation model's own predictions, see :func:`predicted_lesion_context`); a scan
            with such a map has ``context_known`` True even when its mask is unknown.
    """

    def __init__(self, records: Sequence[CaseRecord], mode: str = "train", lesion_patch_prob: float = 0.8, seed: int = 0,
                 flip_prob: float = 0.0, lesion_context: dict[str, np.ndarray] | None = None,
                 patch_sampling: str = "grid"):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if patch_sampling not in PATCH_SAMPLING:
            raise ConfigError(f"patch_sampling must be one of {', '.join(PATCH_SAMPLING)}, got {patch_sampling!r}")
        self.patch_sampling = patch_sampling
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ConfigError(f"train.flip_prob must be in [0, 1], got {flip_prob!r}")
        self.flip_prob = float(flip_prob)
        if not 0.0 <= float(lesion_patch_prob) <= 1.0:
            raise ConfigError(f"train.lesion_patch_prob must be in [0, 1], got {lesion_patch_prob!r}")
        if not records:
            raise ConfigError("a dataset needs at least one scan")
        sizes = {r.patch_size for r in records}
        if len(sizes) > 1:
            raise InputError(records[0].case_dir.parent.name, f"cases were preprocessed with different patch sizes {sorted(sizes)}")
        self.records = list(records)
        self.mode = mode
        self.lesion_patch_prob = float(lesion_patch_prob)
        self.seed = int(seed)
        self.epoch = 0
        self.lesion_context = dict(lesion_context or {})

    @property
    def patch_size(self) -> Triple:
        return self.records[0].patch_size

    def set_epoch(self, epoch: int) -> None:
        """Choose the patches of ``epoch`` (called by the engine before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        record = self.records[index]
        item: dict[str, Any] = {
            "case_id": record.case_id,
            "cls": torch.from_numpy(_load(record, "cls.npy").astype(np.float32)[None]),
            "has_mask": torch.tensor(record.has_mask),
            "label": torch.tensor(record.label_index, dtype=torch.int64),
        }
        if self.mode == "eval":
            image = _load(record, "image.npy").astype(np.float32)
            item["image"] = torch.from_numpy(image[None])
            item["lesion"] = torch.from_numpy(self._lesion(record, image.shape)[None])
            return item
        item.update(self._patch_item(record, self.choose_patch(index)))
        context = self.lesion_context.get(record.case_id)
        if context is None:
            context = self._lesion_on_cls_grid(record, tuple(item["cls"].shape[1:]))
        item["lesion_cls"] = torch.from_numpy(np.asarray(context, dtype=np.float32)[None])
        item["context_known"] = torch.tensor(record.has_mask or record.case_id in self.lesion_context)
        if self.flip_prob and np.random.default_rng([self.seed, self.epoch, index, 1]).random() < self.flip_prob:
            item = mirror_left_right(item)
        return item

    def choose_patch(self, index: int) -> Triple:
        """The start ``(z, y, x)`` of the patch drawn for scan ``index`` in the current epoch (a
        pure function of seed, epoch, index)."""
        record = self.records[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        lesion = record.lesion_patches
        wants_lesion = bool(lesion) and rng.random() < self.lesion_patch_prob
        if self.patch_sampling == "grid":
            chosen = lesion[rng.integers(len(lesion))] if wants_lesion else rng.integers(len(record.starts))
            return record.starts[int(chosen)]
        last = [max(start[axis] for start in record.starts) for axis in range(3)]
        if not wants_lesion:
            return tuple(int(rng.integers(top + 1)) for top in last)  # type: ignore[return-value]
        mask = _load(record, "lesion.npy")
        voxels = np.flatnonzero(mask)
        voxel = np.unravel_index(int(voxels[rng.integers(voxels.size)]), mask.shape)
        # the voxel lands at a uniform offset in the patch; clamping keeps it inside (last >= voxel - size + 1)
        return tuple(int(min(max(v - rng.integers(size), 0), top))  # type: ignore[return-value]
                     for v, size, top in zip(voxel, record.patch_size, last))

    def _patch_item(self, record: CaseRecord, start: Triple) -> dict[str, Any]:
        import torch

        from deepsc.data.patches import extract_patch, normalized_box

        patch = extract_patch(_load(record, "image.npy"), start, record.patch_size).astype(np.float32)
        if record.has_mask:
            mask = extract_patch(_load(record, "lesion.npy"), start, record.patch_size).astype(np.float32)
        else:
            mask = np.zeros(record.patch_size, dtype=np.float32)
        box = np.asarray(normalized_box(start, record.patch_size, record.shape), dtype=np.float32)
        return {"patch": torch.from_numpy(patch[None]), "lesion": torch.from_numpy(mask[None]), "box": torch.from_numpy(box)}

    @staticmethod
    def _lesion_on_cls_grid(record: CaseRecord, cls_shape: tuple[int, ...]) -> np.ndarray:
        """float32 ``(N, Hc, Wc)``: the reference mask by :func:`lesion_on_cls_grid` (zeros when unknown)."""
        if not record.has_mask:
            return np.zeros(cls_shape, dtype=np.float32)
        return lesion_on_cls_grid(_load(record, "lesion.npy"), cls_shape)

    @staticmethod
    def _lesion(record: CaseRecord, shape: tuple[int, ...]) -> np.ndarray:
        if not record.has_mask:
            return np.zeros(shape, dtype=np.float32)
        return _load(record, "lesion.npy").astype(np.float32)


def lesion_on_cls_grid(lesion: np.ndarray, cls_shape: Sequence[int]) -> np.ndarray:
    """float32 ``(N, Hc, Wc)``: a whole-scan lesion map area-averaged onto the classification grid.

    This is the map the classifier reads at inference: :meth:`deepsc.model.DeepSC.infer_scan`
    pastes the tiles' lesion probabilities with :func:`deepsc.model.coords.paste_into_grid`,
    and pasting the whole scan as one box gives the same cell averages. Sampling the map's
    slices like ``cls.npy`` (eq. 12) would instead show the classifier about one slice in
    three in training (46-63 slices onto N = 16 here): small lesions between the sampled
    slices vanish, and the ones hit look denser than the averaged map inference gives.

    Args:
        lesion: ``(Z, Y, X)`` lesion mask or probability, values in [0, 1].
        cls_shape: ``(N, Hc, Wc)``.
    """
    import torch

    from deepsc.model.coords import paste_into_grid

    volume = torch.from_numpy(np.ascontiguousarray(lesion, dtype=np.float32))[None, None]
    whole_scan = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    with torch.no_grad():
        return paste_into_grid(volume, whole_scan, tuple(int(v) for v in cls_shape))[0][0, 0].numpy()


def predicted_lesion_context(segment: Any, records: Sequence[CaseRecord], cls_shape: Sequence[int]) -> dict[str, np.ndarray]:
    """Each scan's whole-scan lesion probability from ``segment``, on the classification grid.

    Joint fine-tuning completes the classifier's lesion map outside the training patch with
    these maps instead of the reference masks: at inference the classifier only ever sees
    predicted maps (under-segmented, with false positives), so training it on perfect masks
    teaches it cues it will not get.

    Args:
        segment: maps a ``(Z, Y, X)`` float32 image to a lesion probability of the same shape.
        records: the training scans.
        cls_shape: ``(N, Hc, Wc)``.
    """
    return {r.case_id: lesion_on_cls_grid(segment(_load(r, "image.npy").astype(np.float32)), cls_shape) for r in records}


# --------------------------------------------------------------------------- reading


def patch_sampling_setting(params: Mapping[str, Any], section: str) -> str:
    """``train.<section>.patch_sampling`` (``grid`` when absent), checked against :data:`PATCH_SAMPLING`."""
    block = (params.get("train") or {}).get(section) or {}
    value = block.get("patch_sampling", "grid")
    if value not in PATCH_SAMPLING:
        raise ConfigError(f"train.{section}.patch_sampling must be one of {', '.join(PATCH_SAMPLING)}, got {value!r}")
    return str(value)


def _read_csv(path: Path, columns: Sequence[str]):
    import pandas as pd

    if not path.is_file():
        raise InputError(path.name, f"{path} does not exist")
    frame = pd.read_csv(path, dtype={"case_id": str}, keep_default_na=False)
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise InputError(path.name, f"lacks the column(s) {', '.join(absent)}")
    return frame


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _case_record(row: Any, preprocessed: Path) -> CaseRecord:
    case_id = str(row.case_id)
    case_dir = Path(str(row.case_dir))
    if not case_dir.is_absolute():
        case_dir = preprocessed / case_dir
    label_index = int(row.label_index)
    if not 0 <= label_index < len(CLASSES) or CLASSES[label_index] != str(row.label):
        raise InputError(case_id, f"label {row.label!r} does not match label_index {row.label_index} (classes {CLASSES})")
    has_mask = _as_bool(row.has_mask)
    needed = ["image.npy", "cls.npy", "meta.json"] + (["lesion.npy"] if has_mask else [])
    absent = [name for name in needed if not (case_dir / name).is_file()]
    if absent:
        raise InputError(case_id, f"{case_dir} lacks {', '.join(absent)}; re-run preprocess")
    meta = json.loads((case_dir / "meta.json").read_text())
    return _with_patch_grid(case_id, label_index, has_mask, case_dir, meta)


def _with_patch_grid(case_id: str, label_index: int, has_mask: bool, case_dir: Path, meta: dict[str, Any]) -> CaseRecord:
    """The patch grid and per-patch lesion counts that preprocess stored in meta.json.

    Keys: ``shape`` (Z, Y, X of image.npy), ``patch_size``, ``patch_starts`` and
    ``patch_lesion_voxels`` (null when the lesion mask is unknown).
    """
    try:
        shape = tuple(int(v) for v in meta["shape"])
        size = tuple(int(v) for v in meta["patch_size"])
        starts = tuple(tuple(int(v) for v in start) for start in meta["patch_starts"])
        counts = meta.get("patch_lesion_voxels")
        lesion_voxels = tuple(int(v) for v in counts) if (has_mask and counts is not None) else (0,) * len(starts)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(case_id, f"meta.json has no valid patch grid ({type(exc).__name__}: {exc}); re-run preprocess") from None
    if len(shape) != 3 or len(size) != 3 or not starts or len(lesion_voxels) != len(starts) or any(len(s) != 3 for s in starts):
        raise InputError(case_id, "meta.json's patch grid is inconsistent (shape, patch_size, patch_starts, patch_lesion_voxels)")
    return CaseRecord(case_id, label_index, has_mask, case_dir, shape, size, starts, lesion_voxels)  # type: ignore[arg-type]


def _load(record: CaseRecord, name: str) -> np.ndarray:
    """Memory-mapped read: a patch touches only its own slices of the scan."""
    return np.load(record.case_dir / name, mmap_mode="r")


def mirror_left_right(item: dict[str, Any]) -> dict[str, Any]:
    """Training augmentation: the scan mirrored across the sagittal plane (x -> 1 - x).

    The classification input, the patch and its lesion mask are flipped along X together and
    the patch's normalised box is mirrored (``x0, x1 -> 1 - x1, 1 - x0``; a zero-padded edge
    patch then starts before 0), so the cross-stitch still finds the patch where it is.
    """
    import torch

    mirrored = dict(item)
    for key in ("cls", "patch", "lesion", "lesion_cls"):
        if key in item:
            mirrored[key] = torch.flip(item[key], dims=(-1,))
    box = item["box"].clone()
    box[2], box[5] = 1.0 - item["box"][5], 1.0 - item["box"][2]
    mirrored["box"] = box
    return mirrored
