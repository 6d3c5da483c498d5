"""Whole-scan inference with any trained model folder: DeepSC (joint, seg-only, cls-only) or a
MONAI baseline (3D UNet, DenseNet121 / ResNet-18).

:class:`Predictor` rebuilds the folder written by ``deepsc train`` / ``deepsc ablate`` /
``deepsc baseline`` (``config.json`` + ``model.pt``, see :func:`deepsc.train.stages.load_model`:
state dict read with ``torch.load(weights_only=True)``, model in ``eval()`` mode so GroupNorm /
InstanceNorm / BatchNorm use inference behaviour) and runs it on ONE preprocessed scan:

* ``image`` ``(Z, Y, X)`` in [0, 1] (``image.npy`` of the preprocessed cohort, any size);
* ``cls_input`` ``(N, Hc, Wc)`` in [0, 1] (``cls.npy``).

What each kind of model returns (:class:`CasePrediction`):

============================  ==============  ===========  ===============================
model (config.json)           lesion_prob     class_prob   evidence
============================  ==============  ===========  ===============================
DeepSC ``task: joint``        (Z, Y, X)       (3,)         V_1..V_3 at (Z, Y, X)
DeepSC ``task: seg``          (Z, Y, X)       None         None
DeepSC ``task: cls``          None            (3,)         V_1..V_3 at (Z, Y, X)
baseline ``kind: unet``       (Z, Y, X)       None         None
baseline ``kind: classifier`` None            (3,)         None
============================  ==============  ===========  ===============================

Segmentation covers the whole scan with sliding windows (``overlap``, params.yaml
``inference.overlap``, default 0.5): the non-overlapping patch grid of :mod:`deepsc.data.patches`
plus patches shifted by half a patch, blended with a centre-weighted Gaussian as nnU-Net does
(edge patches zero-padded, padding dropped), so the probability map has exactly the scan's
shape. About 1.8x the patches of the plain grid on the default cohort and +0.8 / +0.6 Dice
(held-out / independent scans); ``overlap: 0`` runs the plain grid alone. A joint DeepSC's
classifier always sees the plain grid's patches (see ``DeepSC.infer_scan``).

Evidence maps are the class activation maps of the predicted class (units e3, e2, e1), resized
to the scan and min-max normalised to [0, 1] over it. A seg-only model gives no class and no
evidence; a cls-only model gives no lesion map.

Test-time mirroring (``mirror=True``, the default; params.yaml ``inference.mirror``): the scan
and its left-right mirror image (X flipped, as in training's augmentation) both run through the
model, and the lesion probability (flipped back) and class probabilities are averaged, as
nnU-Net does. Twice the time, about one Dice point more on the synthetic cohort. Evidence maps
come from the pass whose own decision matches the averaged one (the un-mirrored pass first),
so they always explain the class reported; when neither pass decided that class (possible with
three classes: (.45, .15, .40) and (.15, .45, .40) average to class 2), the un-mirrored scan
runs once more for the maps of the reported class.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepsc.errors import ConfigError, InputError

KINDS = ("deepsc", "unet", "classifier")
TASKS = ("joint", "seg", "cls")
DEFAULT_CHUNK = 4
DEFAULT_OVERLAP = 0.5


@dataclasses.dataclass(frozen=True)
class CasePrediction:
    """What one model says about one preprocessed scan.

    Attributes:
        lesion_prob: float32 ``(Z, Y, X)`` lesion probability in [0, 1] on the preprocessed grid,
            or None (classification-only model).
        class_prob: float32 ``(3,)`` probabilities in ``deepsc.CLASSES`` order, or None
            (segmentation-only model).
        evidence: three float32 ``(Z, Y, X)`` evidence maps in [0, 1] (V_1 coarse .. V_3 fine),
            or None when the model has no classification subnet with CAMs.
        seconds_seg: wall time of producing ``lesion_prob`` (None without it).
        seconds_cls: wall time of producing ``class_prob`` (None without it). A joint DeepSC
            produces both in ONE pass, so both hold that pass's time.
    """

    lesion_prob: np.ndarray | None
    class_prob: np.ndarray | None
    evidence: list[np.ndarray] | None
    seconds_seg: float | None
    seconds_cls: float | None

    @property
    def predicted_class(self) -> int | None:
        """Index of the most probable class, or None for a segmentation-only model."""
        return None if self.class_prob is None else int(np.argmax(self.class_prob))


def mirror_setting(params: Mapping[str, Any]) -> bool:
    """params.yaml ``inference.mirror`` (default true): test-time left-right mirroring."""
    value = (params.get("inference") or {}).get("mirror", True)
    if not isinstance(value, bool):
        raise ConfigError(f"inference.mirror must be true or false, got {value!r}")
    return value


def overlap_setting(params: Mapping[str, Any]) -> float:
    """params.yaml ``inference.overlap`` (default 0.5): the fraction of a patch that neighbouring
    segmentation windows share; 0 = the non-overlapping grid alone."""
    value = (params.get("inference") or {}).get("overlap", DEFAULT_OVERLAP)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 0.9:
        raise ConfigError(f"inference.overlap must be a fraction in [0, 0.9], got {value!r}")
    return float(value)


def lesion_margin_setting(params: Mapping[str, Any]) -> float:
    """params.yaml ``inference.lesion_margin_mm`` (default 0): how far beyond the segmented lungs
    a reported lesion voxel may lie, in mm.

    The model sees the lungs grown by ``preprocess.mask_margin_mm`` (context, and consolidation
    that a classical lung segmentation leaves out), but outside the lungs its "lesions" are
    mostly chest wall and mediastinum next to subpleural lesions, whose HU resemble
    consolidation: on the default cohort a 0 mm region scores 1-2 Dice points more than the
    15 mm one on the training, held-out and independent scans alike.
    """
    value = (params.get("inference") or {}).get("lesion_margin_mm", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 100.0:
        raise ConfigError(f"inference.lesion_margin_mm must be a number of mm in [0, 100], got {value!r}")
    return float(value)


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; other values are checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu, cuda[:N] or mps, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no GPU is visible to torch")
    return device


class Predictor:
    """A trained model folder, ready to run on whole preprocessed scans.

    Args:
        model: the rebuilt network (DeepSC or a MONAI baseline) in eval mode on ``device``.
        config: the folder's ``config.json`` (needs ``kind``; DeepSC also ``task``).
        device: torch device string the model lives on.
        chunk_size: patches per forward pass (bounds memory; ``evaluate.sw_batch_size``).
        source: where the model came from (shown in reports).
        mirror: average with the left-right mirrored scan (see the module docstring).
        overlap: fraction of a patch that neighbouring segmentation windows share, in [0, 0.9].
    """

    def __init__(self, model: Any, config: dict[str, Any], device: str = "cpu", chunk_size: int = DEFAULT_CHUNK,
                 source: str | None = None, mirror: bool = True, overlap: float = DEFAULT_OVERLAP) -> None:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        overlap_setting({"inference": {"overlap": overlap}})  # the same check as params.yaml's
        kind = config.get("kind", "deepsc")
        if kind not in KINDS:
            raise ConfigError(f"unknown model kind {kind!r} in config.json (known: {', '.join(KINDS)})")
        task = config.get("task") or {"deepsc": "joint", "unet": "seg", "classifier": "cls"}[kind]
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r} in config.json (known: {', '.join(TASKS)})")
        if kind == "deepsc" and task == "cls" and config.get("image_only") is False:
            # the stage-1 classifier learnt from whole-scan lesion maps; alone it would read an
            # empty one (and call every scan the same class). Only the image-only w/o Seg runs alone.
            raise ConfigError(f"this DeepSC classifier ({config.get('stage', 'stage unknown')}) needs a lesion map from a "
                              "segmentation model and cannot run alone; use the fine-tuned model (stage finetune)")
        self.model = model.eval()
        self.config = dict(config)
        self.kind: str = kind
        self.task: str = task
        self.device = device
        self.chunk_size = chunk_size
        self.source = source or "in-memory model"
        self.mirror = bool(mirror)
        self.overlap = float(overlap)
        prep = self.preprocess_params
        self.patch_size: tuple[int, int, int] = tuple(int(v) for v in prep["patch_size"])  # type: ignore[assignment]
        cls_size = tuple(int(v) for v in prep["cls_size"])
        self.cls_shape: tuple[int, int, int] = (int(prep["cls_slices"]), *cls_size)  # type: ignore[assignment]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "auto", chunk_size: int = DEFAULT_CHUNK,
                 mirror: bool = True, overlap: float = DEFAULT_OVERLAP) -> "Predictor":
        """Rebuild a trained model folder (``config.json`` + ``model.pt``).

        Raises:
            InputError: the folder is not a trained model folder, or its weights cannot be read
                or do not fit the architecture in ``config.json``.
        """
        from deepsc.errors import DeepSCError
        from deepsc.train.stages import load_model, read_config

        folder = Path(model_dir)
        read_config(folder)  # clear error for a folder that is not a model folder
        resolved = resolve_device(device)
        try:
            model, config = load_model(folder, resolved)
        except DeepSCError as exc:
            raise InputError(str(folder), f"cannot load the model: {exc}") from None
        except (RuntimeError, KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise InputError(str(folder), f"config.json and model.pt do not fit together ({type(exc).__name__}: {exc})") from None
        return cls(model, config, resolved, chunk_size, source=str(folder), mirror=mirror, overlap=overlap)

    # ------------------------------------------------------------------ description
    @property
    def preprocess_params(self) -> dict[str, Any]:
        """The ``preprocess`` settings the model was trained with (inputs must be made with them)."""
        prep = (self.config.get("params") or {}).get("preprocess")
        if not isinstance(prep, dict) or not {"patch_size", "cls_slices", "cls_size"} <= set(prep):
            raise ConfigError("config.json has no params.preprocess (patch_size, cls_slices, cls_size)")
        return dict(prep)

    @property
    def has_segmentation(self) -> bool:
        return self.task in ("joint", "seg")

    @property
    def has_classification(self) -> bool:
        return self.task in ("joint", "cls")

    @property
    def has_evidence(self) -> bool:
        return self.kind == "deepsc" and self.has_classification

    @property
    def name(self) -> str:
        """Short description: architecture and stage, e.g. ``deepsc finetune (joint)``."""
        arch = self.config.get("architecture") or self.kind
        return f"{arch} {self.config.get('stage', '')} ({self.task})".replace("  ", " ")

    # ------------------------------------------------------------------ inference
    def predict_case(self, image_zyx: np.ndarray, cls_input: np.ndarray, with_evidence: bool = True,
                     case_id: str = "scan") -> CasePrediction:
        """Run the model on one whole preprocessed scan.

        Args:
            image_zyx: ``(Z, Y, X)`` preprocessed scan in [0, 1] (any dtype; used as float32).
            cls_input: ``(N, Hc, Wc)`` classification input of the same scan, in [0, 1].
            with_evidence: compute the evidence maps (3 float32 volumes of the scan's size).
            case_id: name used in error messages.

        Raises:
            InputError: wrong dimensionality, a classification input of another shape than the
                model was trained on, or non-finite values.
        """
        image = self._check_array(image_zyx, "image", case_id)
        cls_arr = self._check_array(cls_input, "cls_input", case_id)
        if self.has_classification and tuple(cls_arr.shape) != self.cls_shape:
            raise InputError(case_id, f"classification input has shape {tuple(cls_arr.shape)}, the model needs {self.cls_shape} "
                                      "(preprocess.cls_slices, cls_size of its training)")
        plain = self._predict_once(image, cls_arr, with_evidence)
        if not self.mirror:
            return plain
        mirrored = self._predict_once(np.ascontiguousarray(image[..., ::-1]), np.ascontiguousarray(cls_arr[..., ::-1]),
                                      with_evidence)
        averaged = _average_with_mirror(plain, mirrored)
        if plain.evidence is not None and averaged.evidence is None:  # neither pass decided the reported class
            again = self._predict_once(image, cls_arr, True, evidence_class=averaged.predicted_class)
            averaged = dataclasses.replace(averaged, evidence=again.evidence)
        return averaged

    def _predict_once(self, image: np.ndarray, cls_arr: np.ndarray, with_evidence: bool,
                      evidence_class: int | None = None) -> CasePrediction:
        """One pass; evidence maps of ``evidence_class`` (default: the class this pass predicts)."""
        if self.kind == "deepsc" and self.task == "joint":
            return self._predict_joint(image, cls_arr, with_evidence, evidence_class)
        lesion_prob = seconds_seg = class_prob = evidence = seconds_cls = None
        if self.has_segmentation:
            started = self._clock()
            lesion_prob = self._segment(image)
            seconds_seg = self._clock() - started
        if self.has_classification:
            started = self._clock()
            class_prob, evidence = self._classify(cls_arr, image.shape, with_evidence, evidence_class)
            seconds_cls = self._clock() - started
        return CasePrediction(lesion_prob, class_prob, evidence, seconds_seg, seconds_cls)

    def _predict_joint(self, image: np.ndarray, cls_arr: np.ndarray, with_evidence: bool,
                       evidence_class: int | None = None) -> CasePrediction:
        import torch

        started = self._clock()
        out = self.model.infer_scan(
            torch.from_numpy(cls_arr)[None, None].to(self.device),
            torch.from_numpy(image)[None, None],
            patch_size=self.patch_size,
            chunk_size=self.chunk_size,
            with_evidence=with_evidence,
            overlap=self.overlap,
            evidence_class=evidence_class,
        )
        seconds = self._clock() - started
        evidence = [np.asarray(v, dtype=np.float32) for v in out["evidence"]] if with_evidence else None
        return CasePrediction(np.asarray(out["lesion_prob"], dtype=np.float32), np.asarray(out["class_prob"], dtype=np.float32),
                              evidence, seconds, seconds)

    def _segment(self, image: np.ndarray) -> np.ndarray:
        """Lesion probability of the whole scan ``(Z, Y, X)`` from the sliding windows of ``self.overlap``."""
        import torch

        if self.kind == "deepsc":
            forward: Callable[[Any], Any] = lambda x: self.model(None, x, None, task="seg")["seg_logit"]  # noqa: E731
        else:
            forward = self.model
        with torch.no_grad():
            return stitch_patch_predictions(image, self.patch_size, self.chunk_size,
                                            lambda batch: torch.sigmoid(forward(batch.to(self.device))), self.overlap)

    def _classify(self, cls_arr: np.ndarray, scan_shape: Sequence[int], with_evidence: bool,
                  evidence_class: int | None = None) -> tuple[np.ndarray, list[np.ndarray] | None]:
        import torch

        x = torch.from_numpy(cls_arr)[None, None].to(self.device)
        with torch.no_grad():
            if self.kind != "deepsc":
                return torch.softmax(self.model(x).float(), dim=1)[0].cpu().numpy().astype(np.float32), None
            target = None if evidence_class is None else torch.tensor([int(evidence_class)])
            out = self.model(x, None, None, task="cls", target=target)
            probs = torch.softmax(out["cls_logit"].float(), dim=1)[0].cpu().numpy().astype(np.float32)
            evidence = evidence_from_cams(out["cams"], scan_shape) if with_evidence else None
        return probs, evidence

    def _clock(self) -> float:
        """Wall clock that waits for queued GPU work, so timings are honest on CUDA."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    @staticmethod
    def _check_array(array: np.ndarray, name: str, case_id: str) -> np.ndarray:
        arr = np.asarray(array)
        if arr.ndim != 3 or min(arr.shape) < 1:
            raise InputError(case_id, f"{name} must be a non-empty 3D array, got shape {arr.shape}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise InputError(case_id, f"{name} holds NaN or infinite values")
        return arr


def _average_with_mirror(plain: CasePrediction, mirrored: CasePrediction) -> CasePrediction:
    """Combine a scan's prediction with its mirror image's (X flipped back); see the module docstring."""
    unflip = lambda a: np.ascontiguousarray(a[..., ::-1])  # noqa: E731
    total = lambda a, b: None if a is None else a + (b or 0.0)  # noqa: E731
    lesion = None if plain.lesion_prob is None else (plain.lesion_prob + unflip(mirrored.lesion_prob)) / 2
    probs = None if plain.class_prob is None else (plain.class_prob + mirrored.class_prob) / 2
    evidence = plain.evidence
    if probs is not None and plain.evidence is not None and plain.predicted_class != int(np.argmax(probs)):
        # the mirrored pass's maps if it decided the reported class; None tells predict_case to make them
        evidence = [unflip(v) for v in mirrored.evidence] if mirrored.predicted_class == int(np.argmax(probs)) else None
    return CasePrediction(lesion, probs, evidence, total(plain.seconds_seg, mirrored.seconds_seg),
                          total(plain.seconds_cls, mirrored.seconds_cls))


def stitch_patch_predictions(image: np.ndarray, patch_size: Sequence[int], chunk_size: int,
                             predict: Callable[[Any], Any], overlap: float = 0.0) -> np.ndarray:
    """Run ``predict`` on every patch of a sliding-window grid and combine the results.

    Args:
        image: ``(Z, Y, X)`` float32 volume.
        patch_size: ``(pd, ph, pw)``.
        chunk_size: patches per call of ``predict``.
        predict: maps a ``(B, 1, pd, ph, pw)`` CPU tensor to ``(B, 1, pd, ph, pw)`` values.
        overlap: 0 = the non-overlapping grid (each voxel's value from the one patch that holds
            it); above 0, :func:`deepsc.data.patches.sliding_grid` with the Gaussian-weighted
            mean of the patches that hold a voxel.

    Returns:
        float32 ``(Z, Y, X)``.
    """
    import torch

    from deepsc.data.patches import blend_patches, extract_patch, gaussian_importance, patch_grid, sliding_grid, stitch_patches

    starts = sliding_grid(image.shape, patch_size, overlap) if overlap else patch_grid(image.shape, patch_size)
    outputs: list[np.ndarray] = []
    for first in range(0, len(starts), chunk_size):
        chunk = starts[first : first + chunk_size]
        batch = torch.from_numpy(np.stack([extract_patch(image, s, patch_size) for s in chunk])[:, None])
        outputs.extend(predict(batch)[:, 0].float().cpu().numpy())
    if overlap:
        return blend_patches(outputs, starts, image.shape, gaussian_importance(patch_size))
    return stitch_patches(outputs, starts, image.shape).astype(np.float32)


def evidence_from_cams(cams: Sequence[Any], scan_shape: Sequence[int]) -> list[np.ndarray]:
    """V_1..V_3 at the scan's size from DeepSC's CAMs ``[e1, e2, e3]`` (each ``(1, 1, grid)``).

    Same construction as ``DeepSC.infer_scan``: units e3, e2, e1 resized to ``scan_shape`` and
    min-max normalised over the scan (a constant map becomes all 0).
    """
    from deepsc.model.coords import resize_to_scan
    from deepsc.model.network import EVIDENCE_UNITS, minmax_per_sample

    shape = tuple(int(v) for v in scan_shape)
    return [minmax_per_sample(resize_to_scan(cams[unit].float(), shape))[0, 0].cpu().numpy().astype(np.float32)
            for unit in EVIDENCE_UNITS]
