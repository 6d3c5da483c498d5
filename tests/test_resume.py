"""A killed run resumes from last.pt and ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
from test_train import ToyAdapter, ToyDataset, same_weights, toy_model


class Killed(Exception):
    """Stands in for SIGKILL: raised right after an epoch's checkpoint is on disk."""


def _kill_after(epoch_to_die: int):
    def callback(epoch: int, record) -> None:
        if epoch == epoch_to_die:
            raise Killed

    return callback


def test_engine_resume_is_bit_exact(tmp_path):
    from deepsc.train.engine import EngineConfig, fit

    config = EngineConfig(epochs=3, lr=5e-2, batch_size=5, seed=11)
    straight = fit(toy_model(), ToyDataset(), ToyAdapter(), config, tmp_path / "straight", progress=False)

    with pytest.raises(Killed):
        fit(toy_model(), ToyDataset(), ToyAdapter(), config, tmp_path / "killed", on_epoch_end=_kill_after(2), progress=False)
    assert not (tmp_path / "killed" / "model.pt").exists()
    # a fresh process would build the model from another random state: weights come from last.pt
    dataset = ToyDataset()
    resumed = fit(toy_model(seed=99), dataset, ToyAdapter(), config, tmp_path / "killed", progress=False)

    assert resumed.resumed_from_epoch == 2 and dataset.epochs_seen == [2]
    assert same_weights(straight.model, resumed.model)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    assert (tmp_path / "killed" / "history.csv").read_text().count("\n") == 4


def test_resumed_run_logs_every_epoch_before_and_after_the_kill(tmp_path):
    """The resumed run's tracking holds the epochs done before the kill too."""
    from deepsc.train.engine import EngineConfig, fit

    config = EngineConfig(epochs=3, lr=5e-2, batch_size=5, seed=11)
    with pytest.raises(Killed):
        fit(toy_model(), ToyDataset(), ToyAdapter(), config, tmp_path, on_epoch_end=_kill_after(2), progress=False)
    logged = []
    resumed = fit(toy_model(), ToyDataset(), ToyAdapter(), config, tmp_path, progress=False,
                  log_metrics=lambda epoch, record: logged.append((epoch, record["loss"])))
    assert logged == [(r["epoch"], r["loss"]) for r in resumed.history] and [e for e, _ in logged] == [1, 2, 3]


def test_checkpoint_is_read_to_the_cpu_whatever_the_training_device(tmp_path):
    """last.pt's RNG states must stay on the CPU (numpy cannot read a CUDA tensor: a GPU resume
    crashed). A device whose tensors cannot be read back, 'meta', stands in for the GPU here."""
    import torch

    from deepsc.train.engine import DistContext, EngineConfig, _maybe_resume, fit

    config = EngineConfig(epochs=2, lr=5e-2, batch_size=5, seed=11)
    with pytest.raises(Killed):
        fit(toy_model(), ToyDataset(), ToyAdapter(), config, tmp_path, on_epoch_end=_kill_after(1), progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    model = toy_model(seed=7)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=10)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ctx = DistContext(rank=0, world_size=1, device=torch.device("meta"), owns_group=False)
    epoch, history = _maybe_resume(tmp_path / "last.pt", json.loads(state["fingerprint"]), model, optimizer, scheduler,
                                   scaler, ctx)
    assert epoch == 1 and len(history) == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state["model"].values()))


def test_finished_checkpoint_returns_at_once(tmp_path):
    from deepsc.train.engine import EngineConfig, fit

    config = EngineConfig(epochs=2, lr=5e-2, batch_size=4)
    first = fit(toy_model(), ToyDataset(), ToyAdapter(), config, tmp_path, progress=False)
    dataset = ToyDataset()
    again = fit(toy_model(seed=5), dataset, ToyAdapter(), config, tmp_path, progress=False)
    assert dataset.epochs_seen == [] and same_weights(first.model, again.model)


def test_deepsc_stage_resume_is_bit_exact(tmp_path):
    """DeepSC pre-training on the tiny cohort: 3 epochs straight == 2 epochs, kill, resume to 3."""
    from test_train import tiny_params, write_tiny_cohort

    from deepsc.train.engine import fit
    from deepsc.train.stages import prepare_stage

    pre, split = write_tiny_cohort(tmp_path)
    params = tiny_params(tmp_path, seg=3)

    def run(out, **kwargs):
        prepared = prepare_stage("pretrain-seg", pre, split, params)
        return fit(prepared.model, prepared.dataset, prepared.adapter, prepared.engine, out, progress=False, **kwargs)

    straight = run(tmp_path / "straight")
    with pytest.raises(Killed):
        run(tmp_path / "killed", on_epoch_end=_kill_after(2))
    import torch

    torch.manual_seed(12345)  # a restarted process is in another random state
    resumed = run(tmp_path / "killed")
    assert resumed.resumed_from_epoch == 2
    assert same_weights(straight.model, resumed.model)
    assert torch.load(tmp_path / "killed" / "model.pt", weights_only=True).keys() == straight.model.state_dict().keys()


def test_stale_checkpoint_of_another_run_is_discarded_not_resumed(tmp_path):
    """DVC keeps persisted outputs when inputs change: a last.pt of other data must not be resumed."""
    from deepsc.train.engine import EngineConfig, fit

    config = EngineConfig(epochs=2, lr=0.05, batch_size=2, seed=3)
    fresh = fit(toy_model(), ToyDataset(), ToyAdapter(), config, tmp_path / "fresh", progress=False,
                identity={"data_key": "new"})
    fit(toy_model(), ToyDataset(), ToyAdapter(), config, tmp_path / "reused", progress=False, identity={"data_key": "old"})
    again = fit(toy_model(), ToyDataset(), ToyAdapter(), config, tmp_path / "reused", progress=False,
                identity={"data_key": "new"})
    assert again.resumed_from_epoch == 0 and len(again.history) == 2
    assert same_weights(again.model, fresh.model)
