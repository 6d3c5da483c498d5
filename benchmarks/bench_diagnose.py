"""Time `deepsc diagnose` on a full-size chest CT against what a user would run instead.

DeepSC (``deepsc.diagnose.diagnose``, end to end: read the NIfTI, lung segmentation,
preprocessing, all non-overlapping patches, classification, mapping back, statistics, the mask /
evidence NIfTIs and the HTML report) versus the usual MONAI recipe on the same scan: HU window,
``sliding_window_inference`` of a 3D UNet over the full-resolution volume (``--roi``,
``--overlap``) plus a 3D DenseNet121 on the volume resized to ``--cls-shape``. Weights are random
(the cost of a forward pass does not depend on them); the networks have the sizes of the chosen
settings profile. Each method runs in its own fresh process, so the peak RSS is its own; on CUDA
the peak allocated GPU memory is printed too.

    python benchmarks/bench_diagnose.py                       # ~300 x 512 x 512, CPU
    python benchmarks/bench_diagnose.py --device cuda --profile paper
    python benchmarks/bench_diagnose.py --model outputs/models/finetune --slices 120

Research use, not for clinical diagnosis.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def build_scan(path: Path, slices: int, size: int, inplane_mm: float, slice_mm: float) -> Path:
    """A synthetic chest CT of ``slices x size x size`` voxels written as NIfTI (int16 HU).

    The anatomy and lesions of ``deepsc.data.synth`` are generated at 128 x 128 and resampled
    linearly to the requested grid (generating 80 M voxels directly takes minutes).
    """
    from scipy import ndimage

    from deepsc.data.synth import SynthConfig, cohort_burdens, synthesize_case
    from deepsc.data.volume import CTVolume, lps_affine, save_nifti

    config = SynthConfig(n_covid=1, n_cap=0, n_normal=0, inplane_size=128, inplane_spacing_mm=(3.0, 3.0),
                         slice_spacing_mm=(4.0, 4.0))
    case = synthesize_case(config, 0, "covid", cohort_burdens(config).get(0))
    small = case.image.array.astype(np.float32)
    zoom = (slices / small.shape[0], size / small.shape[1], size / small.shape[2])
    hu = ndimage.zoom(small, zoom, order=1, grid_mode=True, mode="nearest")
    hu += np.random.default_rng(0).normal(0.0, 15.0, hu.shape).astype(np.float32)
    volume = CTVolume(np.clip(np.rint(hu), -1024, 3071).astype(np.int16), lps_affine((slice_mm, inplane_mm, inplane_mm)), "bench")
    return save_nifti(volume, path, np.int16)


def random_model_dir(folder: Path, params: dict[str, Any]) -> Path:
    """A randomly initialised DeepSC folder (config.json + model.pt) of the profile's size."""
    import torch

    from deepsc import CLASSES
    from deepsc.model.network import DeepSC, ModelConfig

    torch.manual_seed(0)
    model = DeepSC(ModelConfig.from_params(params))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    sections = {k: params[k] for k in ("model", "preprocess", "loss", "train") if k in params}
    config = {"kind": "deepsc", "stage": "finetune", "task": "joint", "classes": list(CLASSES), "params": sections}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ----------------------------------------------------------------------------- the two methods


def run_deepsc(scan: str, model: str, out_dir: str, params: dict[str, Any], device: str) -> dict[str, Any]:
    from deepsc.diagnose import diagnose

    started = time.perf_counter()
    summary = diagnose(scan, model, out_dir, params, device=device, progress=False)
    return {"seconds": time.perf_counter() - started, "steps": summary["timing"]}


def run_monai(scan: str, params: dict[str, Any], device: str, roi: int, overlap: float, sw_batch: int,
              cls_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Read, window, sliding-window UNet at full resolution, DenseNet121 on the resized scan."""
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import DenseNet121

    from deepsc.data.io import read_ct
    from deepsc.model.baselines import build_seg_baseline

    torch.manual_seed(0)
    unet = build_seg_baseline({"baselines": params["baselines"], "preprocess": {}}).to(device).eval()
    densenet = DenseNet121(spatial_dims=3, in_channels=1, out_channels=3).to(device).eval()
    started = time.perf_counter()
    volume = read_ct(scan)
    low, high = params["preprocess"]["hu_window"]
    image = torch.from_numpy(np.clip((volume.array - low) / (high - low), 0, 1).astype(np.float32))[None, None]
    steps = {"seconds_read": time.perf_counter() - started}
    with torch.no_grad():
        t = time.perf_counter()
        logits = sliding_window_inference(image, (roi, roi, roi), sw_batch, unet, overlap=overlap, sw_device=device,
                                          device="cpu", mode="gaussian")
        mask = (torch.sigmoid(logits) >= 0.5).numpy()
        _sync(device)
        steps["seconds_unet_sliding_window"] = time.perf_counter() - t
        t = time.perf_counter()
        resized = F.interpolate(image, size=cls_shape, mode="trilinear", align_corners=False).to(device)
        probs = torch.softmax(densenet(resized), dim=1).cpu().numpy()
        _sync(device)
        steps["seconds_densenet121"] = time.perf_counter() - t
    steps["mask_voxels"] = int(mask.sum())
    steps["probs"] = [round(float(p), 3) for p in probs[0]]
    return {"seconds": time.perf_counter() - started, "steps": steps}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _child(queue: Any, method: str, kwargs: dict[str, Any]) -> None:
    """Run one method in a fresh process and report its time, own peak RSS and CUDA peak."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        result = (run_deepsc if method == "deepsc" else run_monai)(**kwargs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MB
        cuda = torch.cuda.max_memory_allocated() / 2**20 if kwargs["device"].startswith("cuda") else None
        queue.put({**result, "peak_rss_mb": peak, "cuda_max_allocated_mb": cuda})
    except BaseException as exc:  # report, do not hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def in_fresh_process(method: str, **kwargs: Any) -> dict[str, Any]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, method, kwargs))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"{method} failed: {result['error']}")
    return result


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="in-plane voxels (rows = columns)")
    parser.add_argument("--inplane-mm", type=float, default=0.7)
    parser.add_argument("--slice-mm", type=float, default=1.0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--profile", default="default", help="params.yaml profile: network and preprocessing sizes")
    parser.add_argument("--model", type=Path, default=None, help="a trained model folder (default: random weights)")
    parser.add_argument("--roi", type=int, default=96, help="sliding-window edge (voxels) of the MONAI UNet")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch", type=int, default=4)
    parser.add_argument("--cls-shape", type=int, nargs=3, default=(64, 256, 256), help="DenseNet121 input (Z, Y, X)")
    parser.add_argument("--skip-monai", action="store_true", help="time DeepSC only")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from deepsc.config import load_params

    params = load_params(REPO / "params.yaml", args.profile)
    with tempfile.TemporaryDirectory(prefix="bench-diagnose-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        scan = build_scan(root / "scan.nii.gz", args.slices, args.size, args.inplane_mm, args.slice_mm)
        print(f"scan {args.slices} x {args.size} x {args.size} at {args.slice_mm} x {args.inplane_mm} x {args.inplane_mm} mm "
              f"written in {time.perf_counter() - started:.1f} s ({scan.stat().st_size / 2**20:.0f} MB)", flush=True)
        model = args.model or random_model_dir(root / "model", params)
        results = {"deepsc diagnose (end to end)": in_fresh_process(
            "deepsc", scan=str(scan), model=str(model), out_dir=str(root / "out"), params=params, device=args.device)}
        if not args.skip_monai:
            results[f"MONAI UNet sliding window {args.roi}^3 + DenseNet121"] = in_fresh_process(
                "monai", scan=str(scan), params=params, device=args.device, roi=args.roi, overlap=args.overlap,
                sw_batch=args.sw_batch, cls_shape=tuple(args.cls_shape))
    report(results, args)
    return 0


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    reference = next(iter(results.values()))["seconds"]
    print(f"\ndevice {args.device}, profile {args.profile}, {os.cpu_count()} CPU(s) visible")
    print(f"{'method':<55} {'seconds':>9} {'x DeepSC':>9} {'peak RSS MB':>12} {'CUDA max MB':>12}")
    for name, result in results.items():
        cuda = result["cuda_max_allocated_mb"]
        print(f"{name:<55} {result['seconds']:>9.1f} {result['seconds'] / reference:>9.2f} {result['peak_rss_mb']:>12.0f} "
              f"{'-' if cuda is None else f'{cuda:.0f}':>12}")
    for name, result in results.items():
        steps = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result["steps"].items()}
        print(f"  {name}: {json.dumps(steps)}")


if __name__ == "__main__":
    sys.exit(main())
