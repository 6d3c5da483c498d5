"""One training loop for every stage: DeepSC pre-training / fine-tuning and the MONAI baselines.

What changes between stages is an :class:`Adapter` (which parameters train, how a batch goes
through the model, which losses and quick metrics come out); the loop itself is shared:

* Adam (betas 0.9, 0.999), learning rate decayed linearly to 0 over all optimiser steps.
* Deterministic on CPU for a given seed: the sampler's order is a function of (seed, epoch),
  datasets that define ``set_epoch`` get it, and the RNG states are checkpointed.
* A checkpoint every epoch (``last.pt``, written atomically) holding model, optimiser,
  scheduler, grad scaler, epoch, history and RNG states - all plain types and tensors, so it
  loads with ``torch.load(..., weights_only=True)``. A killed run restarted on the same folder
  resumes there and ends with exactly the weights of an uninterrupted run.
* Mixed precision on CUDA (``train.amp``: auto = bf16, or fp16 with a GradScaler); off on CPU.
* Data parallel under ``torchrun`` (DistributedDataParallel + DistributedSampler; nccl on
  GPU, gloo on CPU). Only rank 0 writes files and reports metrics.

The final folder holds ``model.pt`` (state dict only), ``history.csv`` and ``last.pt``;
:mod:`deepsc.train.stages` adds ``config.json`` and ``run.json`` and logs the folder to MLflow.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from deepsc.errors import ConfigError, DeepSCError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

log = logging.getLogger(__name__)

AMP_MODES = ("auto", "off", "bf16", "fp16")
CHECKPOINT = "last.pt"
WEIGHTS = "model.pt"
HISTORY = "history.csv"


class TrainingDiverged(DeepSCError):
    """The loss became NaN or infinite: the settings (usually the learning rate) need changing."""


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one training run.

    Args:
        epochs: passes over the training set (>= 1).
        lr: initial learning rate, decayed linearly to 0 at the last optimiser step.
        batch_size: scans per optimiser step and process (>= 1).
        seed: seed of every random choice (initialisation is seeded by the caller).
        amp: ``auto`` (bf16 on CUDA, off on CPU) | ``off`` | ``bf16`` | ``fp16`` (CUDA only).
        num_workers: DataLoader worker processes.
        cpu_threads: torch intra-op threads on CPU; None keeps torch's default (one per core).
            1 is several times faster when other processes share the cores (busy-waiting threads).
        betas: Adam's betas.
    """

    epochs: int
    lr: float
    batch_size: int
    seed: int = 0
    amp: str = "auto"
    num_workers: int = 0
    cpu_threads: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"train.amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"train.num_workers must be an integer >= 0, got {self.num_workers!r}")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ConfigError(f"train.cpu_threads must be null or an integer >= 1, got {self.cpu_threads!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"Adam betas must be two numbers in [0, 1), got {self.betas!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], stage_key: str, epochs_scale: float = 1.0) -> "EngineConfig":
        """Build from ``params["train"]`` and its ``train.<stage_key>`` block (epochs, lr, batch_size)."""
        train = params.get("train")
        if not isinstance(train, Mapping) or not isinstance(train.get(stage_key), Mapping):
            raise ConfigError(f"params.yaml has no 'train.{stage_key}' section")
        block = train[stage_key]
        missing = [key for key in ("epochs", "lr", "batch_size") if key not in block]
        if missing:
            raise ConfigError(f"train.{stage_key} lacks {', '.join(missing)}")
        return cls(
            epochs=max(1, int(round(block["epochs"] * epochs_scale))),
            lr=float(block["lr"]),
            batch_size=int(block["batch_size"]),
            seed=int(train.get("seed", 0)),
            amp=str(train.get("amp", "auto")),
            num_workers=int(train.get("num_workers", 0)),
            cpu_threads=None if train.get("cpu_threads") is None else int(train["cpu_threads"]),
        )

    def fingerprint(self, n_samples: int, world_size: int) -> dict[str, Any]:
        """Settings a checkpoint must agree with to be resumed (others only change speed)."""
        keep = asdict(self)
        keep.pop("num_workers")
        keep.pop("cpu_threads")
        keep["betas"] = list(self.betas)
        return {**keep, "n_samples": int(n_samples), "world_size": int(world_size)}


class Adapter(Protocol):
    """What a stage plugs into :func:`fit`.

    ``forward`` calls ``model(...)`` (never ``model.forward``, so DDP hooks run) on a batch
    whose tensors are on the device; ``loss`` returns scalar tensors including ``"total"``
    (the one that is back-propagated; every entry is logged); ``batch_metrics`` returns floats
    averaged over the epoch (e.g. batch Dice, accuracy). ``find_unused_parameters`` tells DDP
    that some trainable parameters may not take part in a forward pass.
    """

    find_unused_parameters: bool

    def trainable_parameters(self, model: "torch.nn.Module") -> Sequence["torch.nn.Parameter"]: ...

    def forward(self, model: "torch.nn.Module", batch: Mapping[str, Any]) -> Mapping[str, Any]: ...

    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> Mapping[str, "torch.Tensor"]: ...

    def batch_metrics(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) data-parallel job."""

    rank: int
    world_size: int
    device: "torch.device"
    owns_group: bool  # this module initialised the process group and destroys it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class FitResult:
    """Outcome of :func:`fit`: the trained (unwrapped) model, one record per epoch, the folder."""

    model: "torch.nn.Module"
    history: list[dict[str, float]]
    out_dir: Path
    resumed_from_epoch: int


EpochCallback = Callable[[int, Mapping[str, float]], None]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices); call before building a model."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def distributed_context(prefer_cuda: bool = True) -> DistContext:
    """Join the torchrun job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK), if any.

    A process group that already exists (e.g. created by a test with ``mp.spawn``) is used as
    it is. Backend: nccl when CUDA is used, gloo on CPU.
    """
    import torch
    import torch.distributed as dist

    use_cuda = prefer_cuda and torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owns = False
    if dist.is_available() and not dist.is_initialized() and world > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistContext(rank=rank, world_size=world, device=device, owns_group=owns)


def resolve_amp(mode: str, device: "torch.device") -> "torch.dtype | None":
    """The autocast dtype for ``train.amp`` on this device (None = full precision)."""
    import torch

    if mode not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {', '.join(AMP_MODES)}, got {mode!r}")
    if device.type != "cuda" or mode == "off":
        if mode in ("bf16", "fp16") and device.type != "cuda":
            log.info("train.amp=%s ignored on %s: training in float32", mode, device.type)
        return None
    return torch.float16 if mode == "fp16" else torch.bfloat16


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain numbers (loadable with ``weights_only=True``)."""
    import torch

    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "python_version": int(py_version),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    import torch

    torch.set_rng_state(state["torch"].cpu())
    keys = state["numpy_keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    internal = tuple(int(v) for v in state["python_internal"].cpu().tolist())
    random.setstate((state["python_version"], internal, state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves a half-written file (readers see old or new content)."""
    import torch

    from deepsc.data.volume import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, device: "torch.device | str" = "cpu") -> dict[str, Any]:
    """Load ``last.pt`` safely (``weights_only=True``); a corrupt file is a clear error."""
    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated / foreign file: say which one and what to do
        raise DeepSCError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); delete it to start over") from None


def load_weights(path: Path, device: "torch.device | str" = "cpu") -> dict[str, Any]:
    """Load a ``model.pt`` state dict safely."""
    return load_checkpoint(path, device)


def _unwrap(model: "torch.nn.Module") -> "torch.nn.Module":
    return getattr(model, "module", model)


# --------------------------------------------------------------------------- the loop


def fit(
    model: "torch.nn.Module",
    dataset: "torch.utils.data.Dataset",
    adapter: Adapter,
    config: EngineConfig,
    out_dir: Path,
    *,
    log_metrics: EpochCallback | None = None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
    description: str = "train",
    identity: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` on ``dataset`` and write ``out_dir/{last.pt, model.pt, history.csv}``.

    Resumes from ``out_dir/last.pt`` when it comes from the same run: same engine settings and
    same ``identity`` (e.g. hashes of the model settings, the data and the initial weights). A
    ``last.pt`` of anything else is stale (DVC keeps persisted outputs when inputs change): it is
    discarded with a warning and training starts over. A finished checkpoint returns at once. ``log_metrics(epoch, record)``
    is called on rank 0 after each epoch (e.g. MLflow); ``on_epoch_end(epoch, record)`` on every
    rank after the checkpoint is safely written. Epochs in records count from 1.
    """
    import torch

    out_dir = Path(out_dir)
    ctx = distributed_context()
    if len(dataset) == 0:
        raise DeepSCError(f"{description}: the training set is empty")
    torch.backends.cudnn.benchmark = False
    if ctx.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
    amp_dtype = resolve_amp(config.amp, ctx.device)

    model.to(ctx.device)
    trainable = _freeze_all_but(model, adapter.trainable_parameters(model))
    loader, sampler = _loader(dataset, config, ctx)
    optimizer = torch.optim.Adam(trainable, lr=config.lr, betas=config.betas)
    total_steps = config.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    fingerprint = {**config.fingerprint(len(dataset), ctx.world_size), **dict(identity or {})}
    start_epoch, history = _maybe_resume(out_dir / CHECKPOINT, fingerprint, model, optimizer, scheduler, scaler, ctx)
    if ctx.is_main and log_metrics is not None:
        for record in history:  # a resumed run's tracking holds every epoch, not only those trained now
            log_metrics(int(record["epoch"]), record)
    module = _wrap_ddp(model, adapter, ctx)

    bar = _progress_bar(total_steps, start_epoch * len(loader), description, enabled=progress and ctx.is_main)
    try:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            started = time.perf_counter()
            record = _train_epoch(module, loader, adapter, optimizer, scheduler, scaler, amp_dtype, ctx, bar, epoch)
            record = {"epoch": epoch + 1, **record, "seconds": time.perf_counter() - started}
            history.append(record)
            if ctx.is_main:
                _save_checkpoint(out_dir / CHECKPOINT, model, optimizer, scheduler, scaler, epoch + 1, history, fingerprint)
                log.info("%s epoch %d/%d: %s", description, epoch + 1, config.epochs, _format_record(record))
                if log_metrics is not None:
                    log_metrics(epoch + 1, record)
            _barrier(ctx)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
    finally:
        if bar is not None:
            bar.close()

    if ctx.is_main:
        atomic_torch_save(_cpu_state_dict(model), out_dir / WEIGHTS)
        _write_history(history, out_dir / HISTORY)
    _barrier(ctx)
    if ctx.owns_group:
        torch.distributed.destroy_process_group()
    return FitResult(model=model, history=history, out_dir=out_dir, resumed_from_epoch=start_epoch)


def _freeze_all_but(model: "torch.nn.Module", trainable: Sequence["torch.nn.Parameter"]) -> list["torch.nn.Parameter"]:
    """Train exactly ``trainable``: the rest stops requiring gradients (DDP then ignores it)."""
    chosen = {id(p) for p in trainable}
    if not chosen:
        raise ConfigError("the stage selects no trainable parameters")
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    # model.parameters() order, deduplicated: the optimiser state then lines up on resume
    return [p for p in model.parameters() if id(p) in chosen]


def _loader(dataset, config: EngineConfig, ctx: DistContext):
    """DataLoader whose order depends only on (seed, epoch, rank): the same after a resume."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,  # workers must see set_epoch of each epoch
    )
    return loader, sampler


def _wrap_ddp(model, adapter: Adapter, ctx: DistContext):
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=adapter.find_unused_parameters)


def _maybe_resume(path: Path, fingerprint, model, optimizer, scheduler, scaler, ctx: DistContext):
    """Load ``last.pt`` when it exists; returns (epochs already done, history so far)."""
    if not path.is_file():
        return 0, []
    # to the CPU: the RNG states must stay there (numpy cannot read a CUDA tensor); the
    # load_state_dict calls below copy weights and optimiser moments to the model's device
    state = load_checkpoint(path, "cpu")
    saved = json.loads(state.get("fingerprint", "{}"))
    if saved != fingerprint:
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        log.warning("%s comes from another run (%s differ): training starts over", path, ", ".join(changed))
        return 0, []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    history = [dict(record) for record in state["history"]]
    log.info("resuming %s after epoch %d", path.parent, state["epoch"])
    return int(state["epoch"]), history


def _save_checkpoint(path: Path, model, optimizer, scheduler, scaler, epoch: int, history, fingerprint) -> None:
    atomic_torch_save(
        {
            "model": _unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": int(epoch),
            "history": [{k: float(v) for k, v in record.items()} for record in history],
            "rng": rng_state(),
            "fingerprint": json.dumps(fingerprint, sort_keys=True),
        },
        path,
    )


def _train_epoch(module, loader, adapter: Adapter, optimizer, scheduler, scaler, amp_dtype, ctx, bar, epoch) -> dict[str, float]:
    """One pass; returns sample-weighted means of the losses and metrics over all ranks."""
    import torch

    module.train()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}  # samples behind each entry (a metric may skip a batch)
    lr_at_start = optimizer.param_groups[0]["lr"]
    for step, batch in enumerate(loader):
        batch = _to_device(batch, ctx.device)
        size = _batch_size(batch)
        with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = adapter.forward(module, batch)
        outputs = _to_float32(outputs)  # losses and metrics in full precision
        losses = adapter.loss(outputs, batch)
        total = losses["total"]
        if not torch.isfinite(total.detach()):
            raise TrainingDiverged(f"loss became {total.item()} at epoch {epoch + 1}, step {step + 1}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        with torch.no_grad():
            metrics = adapter.batch_metrics(outputs, batch)
        for name, value in {**{f"loss_{k}" if k != "total" else "loss": v for k, v in losses.items()}, **metrics}.items():
            sums[name] = sums.get(name, 0.0) + _as_float(value) * size
            counts[name] = counts.get(name, 0.0) + size
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{_as_float(total):.4f}")
    record = _all_reduce_means(sums, counts, ctx)
    record["lr"] = float(lr_at_start)
    return record


def _all_reduce_means(sums: dict[str, float], counts: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Sample-weighted means; under DDP over all ranks (every rank takes part in the reduce)."""
    names = sorted(sums)
    if ctx.distributed:
        import torch
        import torch.distributed as dist

        gathered: list[list[str]] = [[] for _ in range(ctx.world_size)]
        dist.all_gather_object(gathered, names)  # a metric may be missing on one rank
        names = sorted(set().union(*gathered))
        packed = torch.tensor([sums.get(n, 0.0) for n in names] + [counts.get(n, 0.0) for n in names],
                              dtype=torch.float64, device=ctx.device)
        dist.all_reduce(packed)
        values = packed.tolist()
        sums, counts = dict(zip(names, values[: len(names)])), dict(zip(names, values[len(names) :]))
    return {name: sums[name] / counts[name] for name in names if counts[name] > 0}


def _to_device(batch: Any, device) -> Any:
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _to_float32(outputs: Any) -> Any:
    import torch

    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, Mapping):
        return {k: _to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float32(v) for v in outputs)
    return outputs


def _as_float(value: Any) -> float:
    return float(value.detach()) if hasattr(value, "detach") else float(value)


def _batch_size(batch: Any) -> int:
    import torch

    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
    raise DeepSCError("a training batch must be a mapping holding at least one batched tensor")


def _barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def _cpu_state_dict(model) -> dict[str, Any]:
    return {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}


def _progress_bar(total: int, done: int, description: str, enabled: bool):
    if not enabled:
        return None
    import sys

    from tqdm.auto import tqdm

    # in logs (DVC, kubectl logs) a line every 30 s, on a terminal a live bar
    interval = 1.0 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=done, desc=description, unit="step", dynamic_ncols=True, mininterval=interval)


def _format_record(record: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch")


def _write_history(history: Sequence[Mapping[str, float]], path: Path) -> None:
    import pandas as pd

    from deepsc.data.volume import atomic_write_bytes

    frame = pd.DataFrame(list(history))
    if "epoch" in frame:
        frame["epoch"] = frame["epoch"].astype(int)
    atomic_write_bytes(path, frame.to_csv(index=False).encode())
