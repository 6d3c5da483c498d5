"""Training throughput and peak memory of DeepSC per stage, on synthetic tensors.

For each profile (params.yaml ``default`` and/or ``paper``) and stage (pretrain-seg,
pretrain-cls, finetune) this runs the real training step of :mod:`deepsc.train` (the stage's
adapter: forward, loss, backward, Adam step) on random inputs of the profile's shapes and
prints scans per second, seconds per scan, and peak memory (process RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU). It then estimates the wall time of each stage on
a cohort of ``--train-scans`` scans with the epochs in params.yaml.

    python benchmarks/bench_train.py                           # default profile
    python benchmarks/bench_train.py --profile paper --steps 2 # a few steps of the paper profile
    python benchmarks/bench_train.py --profile default paper --device cuda
"""

from __future__ import annotations

import argparse
import math
import dataclasses
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("pretrain-seg", "pretrain-cls", "finetune")


def synthetic_batch(params: Mapping[str, Any], batch_size: int, device: "torch.device", seed: int = 0) -> dict[str, Any]:
    """A batch shaped like :class:`deepsc.train.dataset.ScanDataset` items (one scan each)."""
    import torch

    from deepsc.model.network import ModelConfig

    config = ModelConfig.from_params(params)
    generator = torch.Generator().manual_seed(seed)
    patch = torch.rand(batch_size, 1, *config.patch_size, generator=generator)
    lesion = (torch.rand(batch_size, 1, *config.patch_size, generator=generator) > 0.9).float()
    # a patch in the middle of a scan twice its size along each axis
    box = torch.tensor([[0.25, 0.25, 0.25, 0.75, 0.75, 0.75]] * batch_size)
    batch = {
        "cls": torch.rand(batch_size, 1, *config.cls_shape, generator=generator),
        "patch": patch,
        "lesion": lesion,
        "box": box,
        "has_mask": torch.ones(batch_size, dtype=torch.bool),
        "label": torch.arange(batch_size) % 3,
    }
    return {k: v.to(device) for k, v in batch.items()}


def peak_memory_mb(device: "torch.device") -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_stage(params: Mapping[str, Any], stage: str, steps: int, warmup: int, device: "torch.device",
                batch_size: int | None = None) -> dict[str, float]:
    """Seconds per training step and scan for one stage (after ``warmup`` untimed steps).

    ``batch_size`` overrides the stage's (e.g. 1 to fit the paper profile in CPU memory).
    """
    import torch

    from deepsc.model.losses import LossConfig
    from deepsc.model.network import DeepSC, ModelConfig
    from deepsc.train.engine import EngineConfig, _to_float32, resolve_amp
    from deepsc.train.stages import STAGE_SECTION, DeepSCAdapter, stage_plan

    engine = EngineConfig.from_params(params, STAGE_SECTION[stage])
    if batch_size:
        engine = dataclasses.replace(engine, batch_size=batch_size)
    plan = stage_plan(stage, params)
    torch.manual_seed(0)
    model = DeepSC(ModelConfig.from_params(params)).to(device).train()
    adapter = DeepSCAdapter(plan, LossConfig.from_params(params, class_counts=[1, 1, 1]))
    trainable = adapter.trainable_parameters(model)
    optimizer = torch.optim.Adam(trainable, lr=engine.lr, betas=engine.betas)
    amp = resolve_amp(engine.amp, device)
    batch = synthetic_batch(params, engine.batch_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            outputs = adapter.forward(model, batch)
        loss = adapter.loss(_to_float32(outputs), batch)["total"]  # as the engine: losses in float32
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    cpu_seconds = (time.process_time() - cpu_started) / steps
    return {
        "batch_size": engine.batch_size,
        "epochs": engine.epochs,
        "s_per_step": seconds,
        "s_per_scan": seconds / engine.batch_size,
        "cpu_s_per_scan": cpu_seconds / engine.batch_size,  # CPU time of all threads: robust to busy machines
        "scans_per_s": engine.batch_size / seconds,
        "peak_mb": peak_memory_mb(device),
        "parameters_m": sum(p.numel() for p in trainable) / 1e6,
    }


def amp_agreement(params: Mapping[str, Any], device: "torch.device", dtype: "torch.dtype") -> dict[str, float]:
    """One joint fine-tuning forward/backward under autocast ``dtype`` vs float32, same weights and
    batch: relative error of the loss and of the whole gradient vector, and whether all is finite."""
    import torch

    from deepsc.model.losses import LossConfig
    from deepsc.model.network import DeepSC, ModelConfig
    from deepsc.train.engine import _to_float32
    from deepsc.train.stages import DeepSCAdapter, stage_plan

    torch.manual_seed(0)
    model = DeepSC(ModelConfig.from_params(params)).to(device).train()
    adapter = DeepSCAdapter(stage_plan("finetune", params), LossConfig.from_params(params, class_counts=[1, 1, 1]))
    batch = synthetic_batch(params, 2, device, seed=1)

    def loss_and_grad(amp: "torch.dtype | None") -> tuple[float, "torch.Tensor"]:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            outputs = adapter.forward(model, batch)
        loss = adapter.loss(_to_float32(outputs), batch)["total"]
        loss.backward()
        grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        return float(loss), grad

    ref_loss, ref_grad = loss_and_grad(None)
    amp_loss, amp_grad = loss_and_grad(dtype)
    return {
        "loss_rel_err": abs(amp_loss - ref_loss) / abs(ref_loss),
        "grad_rel_err": float((amp_grad - ref_grad).norm() / ref_grad.norm()),
        "finite": bool(torch.isfinite(amp_grad).all()) and math.isfinite(amp_loss),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from deepsc.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", nargs="+", default=["default"], choices=["default", "paper", "long"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per stage (default: 6, paper: 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="override every stage's batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-scans", type=int, default=68, help="training scans for the wall-time estimate")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--check-amp", action="store_true", help="on CUDA: compare bf16 / fp16 autocast with float32")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} train_scans={args.train_scans}")
    header = f"{'profile':8} {'stage':13} {'batch':>5} {'params(M)':>9} {'s/step':>8} {'s/scan':>8} {'scans/s':>8} {'cpu s/scan':>10} {'peak MB':>8} {'epochs':>6} {'est. s':>8}"
    if args.check_amp and device.type == "cuda":
        for profile in args.profile:
            params = load_params(REPO / "params.yaml", profile)
            for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
                r = amp_agreement(params, device, dtype)
                print(f"amp {profile:8} {name}: loss rel. error {r['loss_rel_err']:.2e}, gradient rel. error "
                      f"{r['grad_rel_err']:.2e}, finite {r['finite']}")
    print(header)
    for profile in args.profile:
        params = load_params(REPO / "params.yaml", profile)
        steps = args.steps or (2 if profile == "paper" else 6)
        total = 0.0
        for stage in STAGES:
            r = bench_stage(params, stage, steps, args.warmup, device, args.batch_size)
            estimate = r["s_per_scan"] * args.train_scans * r["epochs"]
            total += estimate
            print(f"{profile:8} {stage:13} {r['batch_size']:5d} {r['parameters_m']:9.3f} {r['s_per_step']:8.3f} "
                  f"{r['s_per_scan']:8.3f} {r['scans_per_s']:8.2f} {r['cpu_s_per_scan']:10.3f} {r['peak_mb']:8.0f} {r['epochs']:6d} {estimate:8.0f}")
            sys.stdout.flush()
        print(f"{profile:8} {'all stages':13} estimated training time {total:.0f} s ({total / 60:.1f} min) on {args.train_scans} scans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
