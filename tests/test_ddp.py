"""Data-parallel training: two CPU processes on gloo end with identical weights.

The workers join a process group the way ``torchrun`` sets them up (environment variables
MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE); the engine's DistributedSampler splits the scans
between them and DDP averages the gradients. Each rank starts from different random weights, so
equality at the end also shows that DDP broadcast rank 0's initial weights.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, root: str, stage: str) -> None:
    import os

    import torch

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)})
    torch.set_num_threads(1)
    from test_train import tiny_params

    from deepsc.train.engine import fit
    from deepsc.train.stages import prepare_stage

    root_path = Path(root)
    params = tiny_params(root_path, seg=2, finetune=2)
    init = {"seg": root_path / "seg_init", "cls": root_path / "cls_init"} if stage == "finetune" else None
    prepared = prepare_stage(stage, root_path / "preprocessed", root_path / "split.csv", params, init)
    torch.manual_seed(100 + rank)  # different starting weights per rank: DDP must broadcast rank 0's
    for parameter in prepared.model.parameters():
        parameter.data.normal_(0.0, 0.05)
    result = fit(prepared.model, prepared.dataset, prepared.adapter, prepared.engine, root_path / f"run_{stage}", progress=False)
    torch.save(result.model.state_dict(), root_path / f"{stage}_rank{rank}.pt")


def _toy_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)})
    torch.set_num_threads(1)
    from test_train import ToyAdapter, ToyDataset, toy_model

    from deepsc.train.engine import EngineConfig, fit

    # one process group for both fits below: fit() then neither creates nor destroys it (a
    # second rendezvous on the same port can hang when rank 0 re-opens the store too late)
    torch.distributed.init_process_group("gloo")
    result = fit(toy_model(seed=rank), ToyDataset(), ToyAdapter(), EngineConfig(epochs=2, lr=5e-2, batch_size=3, seed=4),
                 Path(out) / "run", progress=False)
    torch.save(result.model.state_dict(), Path(out) / f"rank{rank}.pt")
    torch.save(result.history, Path(out) / f"history{rank}.pt")
    # without dropout (no per-rank randomness), against one process with the whole batch
    plain = fit(_plain_model(seed=rank), ToyDataset(), ToyAdapter(), PLAIN_CONFIG(batch_size=3), Path(out) / "plain",
                progress=False)
    torch.save(plain.model.state_dict(), Path(out) / f"plain{rank}.pt")
    torch.distributed.destroy_process_group()


def _plain_model(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def PLAIN_CONFIG(batch_size: int):  # noqa: N802 - a settings factory shared by both sides of the comparison
    from deepsc.train.engine import EngineConfig

    return EngineConfig(epochs=3, lr=5e-2, batch_size=batch_size, seed=4)


def test_engine_two_gloo_processes_agree(tmp_path):
    """The engine alone (toy model, fast): same weights and the same all-reduced metrics."""
    import torch
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_toy_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["history.csv", "last.pt", "model.pt"]
    histories = [torch.load(tmp_path / f"history{r}.pt", weights_only=False) for r in range(WORLD)]
    strip = lambda history: [{k: v for k, v in record.items() if k != "seconds"} for record in history]  # noqa: E731
    assert strip(histories[0]) == strip(histories[1])

    # the sampler splits each global batch between the ranks and DDP averages their gradients:
    # two ranks of 3 scans train like one process with batches of 6 (rank 0's initial weights)
    from deepsc.train.engine import fit
    from test_train import ToyAdapter, ToyDataset

    single = fit(_plain_model(seed=0), ToyDataset(), ToyAdapter(), PLAIN_CONFIG(batch_size=6), tmp_path / "single",
                 progress=False).model.state_dict()
    parallel = torch.load(tmp_path / "plain0.pt", weights_only=True)
    untrained = _plain_model(seed=0).state_dict()
    assert all(torch.allclose(parallel[k], single[k], atol=1e-5) for k in single)
    assert not all(torch.allclose(untrained[k], single[k], atol=1e-3) for k in single)  # it did train


def _fake_stage1(folder: Path, stage: str, state: dict, params: dict) -> Path:
    """A stage-1 folder holding random weights (the test needs the format, not a trained model;
    fine-tuning rebuilds the stage-1 segmenter from its config to segment the training scans)."""
    import json

    import torch

    folder.mkdir()
    torch.save(state, folder / "model.pt")
    (folder / "config.json").write_text(json.dumps({"kind": "deepsc", "stage": stage, "params": params}))
    return folder


@pytest.mark.slow  # two processes importing torch + monai: about 40 s on two busy cores
@pytest.mark.parametrize("stage", ["pretrain-seg", "finetune"])
def test_two_gloo_processes_end_with_identical_weights(tmp_path, stage):
    import torch
    import torch.multiprocessing as mp
    from test_train import tiny_params, write_tiny_cohort

    from deepsc.model.network import DeepSC, ModelConfig

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    write_tiny_cohort(tmp_path)
    if stage == "finetune":  # joint task: every parameter, DDP without find_unused_parameters
        params = tiny_params(tmp_path)
        state = DeepSC(ModelConfig.from_params(params)).state_dict()
        _fake_stage1(tmp_path / "seg_init", "pretrain-seg", state, params)
        _fake_stage1(tmp_path / "cls_init", "pretrain-cls", state, params)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), stage), nprocs=WORLD, join=True)

    states = [torch.load(tmp_path / f"{stage}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # only rank 0 writes the run folder
    run = tmp_path / f"run_{stage}"
    assert sorted(p.name for p in run.iterdir()) == ["history.csv", "last.pt", "model.pt"]
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and all(torch.equal(checkpoint["model"][k], states[0][k]) for k in states[0])
    assert "world_size\": 2" in checkpoint["fingerprint"]
