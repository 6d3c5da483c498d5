"""Training engine, dataset and stages on a tiny preprocessed cohort built here.

The cohort helpers (`write_tiny_cohort`, `tiny_params`, the toy model/adapter) are imported by
test_resume.py, test_ddp.py and test_ablation.py too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepsc import CLASSES
from deepsc.errors import ConfigError, InputError

SCAN_SHAPE = (16, 32, 32)
PATCH = (8, 32, 32)
CLS_SHAPE = (16, 32, 32)  # DeepSC needs multiples of 16

# case_id, label, has_mask, subset; lesions of covid/cap scans lie in the upper patch (z >= 8)
TINY_CASES = [
    ("c0", "covid", True, "train"), ("c1", "covid", True, "train"), ("c2", "covid", False, "train"),
    ("p0", "cap", True, "train"), ("p1", "cap", True, "test"),
    ("n0", "normal", True, "train"), ("n1", "normal", True, "train"), ("n2", "normal", True, "test"),
]


def write_tiny_cohort(root: Path) -> tuple[Path, Path]:
    """Preprocessed cohort + split in the documented format (docs/architecture.md)."""
    from deepsc.data.patches import extract_patch, patch_grid

    pre = root / "preprocessed"
    rows, split_rows = [], []
    for i, (case_id, label, has_mask, subset) in enumerate(TINY_CASES):
        rng = np.random.default_rng(i)
        image = rng.uniform(0.0, 0.3, SCAN_SHAPE).astype(np.float32)
        lesion = np.zeros(SCAN_SHAPE, dtype=np.uint8)
        if label != "normal":
            lesion[10:14, 8 + i : 16 + i, 10:20] = 1
            image[lesion == 1] += 0.5
        case_dir = pre / "cases" / case_id
        case_dir.mkdir(parents=True)
        np.save(case_dir / "image.npy", image.astype(np.float16))
        np.save(case_dir / "lung.npy", np.ones(SCAN_SHAPE, dtype=np.uint8))
        if has_mask:
            np.save(case_dir / "lesion.npy", lesion)
        np.save(case_dir / "cls.npy", image[:: SCAN_SHAPE[0] // CLS_SHAPE[0]].astype(np.float16))
        starts = patch_grid(SCAN_SHAPE, PATCH)
        counts = [int(extract_patch(lesion, s, PATCH).sum()) if has_mask else 0 for s in starts]
        meta = {"case_id": case_id, "shape": list(SCAN_SHAPE), "patch_size": list(PATCH),
                "patch_starts": [list(s) for s in starts], "patch_lesion_voxels": counts if has_mask else None}
        (case_dir / "meta.json").write_text(json.dumps(meta))
        rows.append(f"{case_id},{label},{CLASSES.index(label)},{has_mask},cases/{case_id},hash{i}")
        split_rows.append(f"{case_id},{label},{subset},{i % 2 if subset == 'train' else -1}")
    (pre / "index.csv").write_text("case_id,label,label_index,has_mask,case_dir,content_hash\n" + "\n".join(rows) + "\n")
    split = root / "split.csv"
    split.write_text("case_id,label,subset,fold\n" + "\n".join(split_rows) + "\n")
    return pre, split


def tiny_params(root: Path, **epochs: int) -> dict:
    """params.yaml with tiny shapes, 1-2 epochs and MLflow in `root`."""
    from deepsc.config import apply_overrides, load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", "default")
    params = apply_overrides(params, {
        "preprocess.patch_size": list(PATCH),
        "preprocess.cls_slices": CLS_SHAPE[0],
        "preprocess.cls_size": list(CLS_SHAPE[1:]),
        "model.seg_widths": [8, 8, 8, 8],
        "model.cls_widths": [8, 8, 8],
        "model.norm_groups": 2,
        "mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "train.pretrain_seg": {"epochs": epochs.get("seg", 1), "lr": 1e-3, "batch_size": 2},
        "train.pretrain_cls": {"epochs": epochs.get("cls", 1), "lr": 1e-3, "batch_size": 2},
        "train.finetune": {"epochs": epochs.get("finetune", 1), "lr": 1e-4, "batch_size": 2},
    })
    return params


# --------------------------------------------------------------------------- toy pieces


class ToyDataset:
    """12 samples of 4 features; label = sign of the feature sum. Records set_epoch calls."""

    def __init__(self, n: int = 12):
        import torch

        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = (self.x.sum(1) > 0).long()
        self.epochs_seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs_seen.append(epoch)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": self.y[i]}


class ToyAdapter:
    find_unused_parameters = False

    def trainable_parameters(self, model):
        return list(model.parameters())

    def forward(self, model, batch):
        return {"logit": model(batch["x"])}

    def loss(self, outputs, batch):
        import torch.nn.functional as F

        return {"total": F.cross_entropy(outputs["logit"], batch["label"])}

    def batch_metrics(self, outputs, batch):
        return {"accuracy": float((outputs["logit"].argmax(1) == batch["label"]).float().mean())}


def toy_model(seed: int = 1):
    """A small MLP with dropout (so resuming must restore the RNG state to match)."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(__import__("torch").equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- engine


def test_engine_config_rejects_bad_settings():
    from deepsc.train.engine import EngineConfig

    with pytest.raises(ConfigError, match="epochs"):
        EngineConfig(epochs=0, lr=1e-3, batch_size=1)
    with pytest.raises(ConfigError, match="lr"):
        EngineConfig(epochs=1, lr=float("nan"), batch_size=1)
    with pytest.raises(ConfigError, match="amp"):
        EngineConfig(epochs=1, lr=1e-3, batch_size=1, amp="fp8")
    with pytest.raises(ConfigError, match="cpu_threads"):
        EngineConfig(epochs=1, lr=1e-3, batch_size=1, cpu_threads=0)
    with pytest.raises(ConfigError, match="train.finetune"):
        EngineConfig.from_params({"train": {}}, "finetune")


def test_engine_config_from_params(params):
    from deepsc.train.engine import EngineConfig

    config = EngineConfig.from_params(params, "finetune", epochs_scale=0.5)
    assert config.lr == params["train"]["finetune"]["lr"] and config.seed == params["train"]["seed"]
    assert config.epochs == max(1, round(params["train"]["finetune"]["epochs"] * 0.5))


def test_amp_is_off_on_cpu():
    import torch

    from deepsc.train.engine import resolve_amp

    for mode in ("auto", "off", "bf16", "fp16"):
        assert resolve_amp(mode, torch.device("cpu")) is None
    assert resolve_amp("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_amp("fp16", torch.device("cuda")) is torch.float16


def test_rng_state_round_trips_through_weights_only_checkpoint(tmp_path):
    import random

    import torch

    from deepsc.train.engine import atomic_torch_save, load_checkpoint, rng_state, set_rng_state

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    atomic_torch_save({"rng": rng_state()}, tmp_path / "state.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(load_checkpoint(tmp_path / "state.pt")["rng"])  # weights_only=True inside
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


def test_fit_trains_writes_outputs_and_decays_lr(tmp_path):
    import torch

    from deepsc.train.engine import EngineConfig, fit

    dataset = ToyDataset()
    result = fit(toy_model(), dataset, ToyAdapter(), EngineConfig(epochs=4, lr=5e-2, batch_size=4, seed=0), tmp_path, progress=False)
    assert dataset.epochs_seen == [0, 1, 2, 3]
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] == pytest.approx(5e-2) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(5e-2 / 4)  # linear: the last epoch starts at 1/4, ends at 0
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(state) == set(result.model.state_dict())
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 4 and checkpoint["scheduler"]["last_epoch"] == 4 * 3
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert history[0].split(",")[0] == "epoch" and len(history) == 5


def test_fit_starts_over_from_a_checkpoint_of_other_settings(tmp_path, caplog):
    from deepsc.train.engine import EngineConfig, fit

    fit(toy_model(), ToyDataset(), ToyAdapter(), EngineConfig(epochs=1, lr=1e-2, batch_size=4), tmp_path, progress=False)
    with caplog.at_level("WARNING"):
        again = fit(toy_model(), ToyDataset(), ToyAdapter(), EngineConfig(epochs=1, lr=2e-2, batch_size=4), tmp_path, progress=False)
    assert again.resumed_from_epoch == 0 and "lr" in caplog.text and "starts over" in caplog.text


def test_fit_stops_on_a_diverging_loss(tmp_path):
    from deepsc.train.engine import EngineConfig, TrainingDiverged, fit

    class NaNAdapter(ToyAdapter):
        def loss(self, outputs, batch):
            return {"total": outputs["logit"].sum() * float("nan")}

    with pytest.raises(TrainingDiverged, match="epoch 1, step 1"):
        fit(toy_model(), ToyDataset(), NaNAdapter(), EngineConfig(epochs=1, lr=1e-2, batch_size=4), tmp_path, progress=False)


def test_fit_trains_only_the_adapters_parameters(tmp_path):
    import torch

    from deepsc.train.engine import EngineConfig, fit

    class FirstLayerOnly(ToyAdapter):
        def trainable_parameters(self, model):
            return list(model[0].parameters())

    model = toy_model()
    frozen = {k: v.clone() for k, v in model[3].state_dict().items()}
    fit(model, ToyDataset(), FirstLayerOnly(), EngineConfig(epochs=1, lr=1e-2, batch_size=4), tmp_path, progress=False)
    assert all(torch.equal(model[3].state_dict()[k], v) for k, v in frozen.items())


# --------------------------------------------------------------------------- dataset


@pytest.fixture
def cohort(tmp_path):
    return write_tiny_cohort(tmp_path)


def test_read_cohort_selects_the_subset_and_counts_classes(cohort):
    from deepsc.train.dataset import class_counts, read_cohort

    pre, split = cohort
    train = read_cohort(pre, split, "train")
    assert [r.case_id for r in train] == ["c0", "c1", "c2", "p0", "n0", "n1"]
    assert class_counts(train) == [3, 1, 2]
    assert [r.case_id for r in read_cohort(pre, split, "train", folds=[1])] == ["c1", "p0", "n0"]
    c2 = train[2]
    assert not c2.has_mask and c2.lesion_patches == ()
    assert train[0].lesion_patches == (1,) and train[0].shape == SCAN_SHAPE and len(train[0].starts) == 2


def test_read_cohort_names_the_broken_case(cohort):
    from deepsc.train.dataset import read_cohort

    pre, split = cohort
    (pre / "cases" / "p0" / "cls.npy").unlink()
    with pytest.raises(InputError, match="p0.*cls.npy"):
        read_cohort(pre, split, "train")
    split.write_text(split.read_text() + "ghost,covid,train,0\n")
    with pytest.raises(InputError, match="ghost"):
        read_cohort(pre, split, "train")
    with pytest.raises(ConfigError, match="subset"):
        read_cohort(pre, split, "validation")


def test_training_items_have_documented_shapes(cohort):
    import torch

    from deepsc.train.dataset import ScanDataset, read_cohort

    dataset = ScanDataset(read_cohort(*cohort, "train"), "train", lesion_patch_prob=1.0, seed=3)
    item = dataset[0]
    assert item["cls"].shape == (1, *CLS_SHAPE) and item["cls"].dtype == torch.float32
    assert item["patch"].shape == (1, *PATCH) and item["lesion"].shape == (1, *PATCH)
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 0 and bool(item["has_mask"])
    # lesion_patch_prob = 1: the lesion patch (upper half, z >= 8) with its lesion, box (0.5 .. 1)
    assert item["lesion"].sum() > 0
    torch.testing.assert_close(item["box"], torch.tensor([0.5, 0.0, 0.0, 1.0, 1.0, 1.0]))
    unknown = dataset[2]  # c2: covid without a mask
    assert not bool(unknown["has_mask"]) and unknown["lesion"].sum() == 0


def test_lesion_context_is_the_cell_average_that_inference_pastes():
    """The classifier's lesion map outside a training patch is what DeepSC.infer_scan builds
    from its tiles, including lesions on slices that the eq. 12 sampling of cls.npy skips."""
    import torch

    from deepsc.data.patches import extract_patch, normalized_box, patch_grid
    from deepsc.data.preprocess import classification_input, cls_slice_indices
    from deepsc.model.coords import paste_into_grid
    from deepsc.train.dataset import lesion_on_cls_grid

    shape, size, grid = (37, 45, 52), (8, 16, 16), (16, 32, 32)
    lesion = (np.random.default_rng(0).random(shape) > 0.9).astype(np.float32)
    tiles = patch_grid(shape, size)
    patches = torch.from_numpy(np.stack([extract_patch(lesion, s, size) for s in tiles])[:, None])
    boxes = torch.tensor([normalized_box(s, size, shape) for s in tiles], dtype=torch.float32)
    pasted = paste_into_grid(patches, boxes, grid)[0].sum(dim=0)[0].numpy()
    np.testing.assert_allclose(lesion_on_cls_grid(lesion, grid), pasted, atol=1e-5)

    thin = np.zeros(shape, dtype=np.float32)
    skipped = min(set(range(shape[0])) - set(cls_slice_indices(shape[0], grid[0]).tolist()))
    thin[skipped, 10:20, 10:30] = 1.0
    assert classification_input(thin, grid[0], grid[1:]).max() == 0.0
    context = lesion_on_cls_grid(thin, grid)
    assert context.dtype == np.float32 and context.shape == grid
    assert context.mean() == pytest.approx(thin.mean(), rel=1e-5)   # the lesion's volume share is kept


def test_patch_draws_are_lesion_biased_and_reproducible(cohort):
    from deepsc.train.dataset import ScanDataset, read_cohort

    records = read_cohort(*cohort, "train")
    biased = ScanDataset(records, "train", lesion_patch_prob=0.8, seed=0)
    uniform = ScanDataset(records, "train", lesion_patch_prob=0.0, seed=0)

    def lesion_share(dataset) -> float:
        draws = []
        for epoch in range(200):
            dataset.set_epoch(epoch)
            draws.append(dataset.choose_patch(0))
        return sum(d == records[0].starts[1] for d in draws) / len(draws)

    assert 0.85 <= lesion_share(biased) <= 0.95  # 0.8 + 0.2 * 1/2
    assert 0.35 <= lesion_share(uniform) <= 0.65
    again = ScanDataset(records, "train", lesion_patch_prob=0.8, seed=0)
    for epoch in (0, 7):
        biased.set_epoch(epoch), again.set_epoch(epoch)
        assert [biased.choose_patch(i) for i in range(len(records))] == [again.choose_patch(i) for i in range(len(records))]


def test_random_patches_start_anywhere_up_to_the_last_tile_and_keep_the_lesion(cohort):
    from deepsc.train.dataset import ScanDataset, read_cohort

    records = read_cohort(*cohort, "train")
    lesion_only = ScanDataset(records, "train", lesion_patch_prob=1.0, seed=0, patch_sampling="random")
    anywhere = ScanDataset(records, "train", lesion_patch_prob=0.0, seed=0, patch_sampling="random")
    lesion_starts, any_starts = set(), set()
    for epoch in range(60):
        lesion_only.set_epoch(epoch), anywhere.set_epoch(epoch)
        item = lesion_only[0]  # c0: lesion at z 10..13
        assert item["lesion"].sum() > 0
        lesion_starts.add(lesion_only.choose_patch(0))
        any_starts.add(anywhere.choose_patch(0))
    # scan (16, 32, 32), patch (8, 32, 32): z starts 0..8 (the grid's last tile), y = x = 0
    assert all(0 <= z <= 8 and y == 0 and x == 0 for z, y, x in any_starts | lesion_starts)
    assert len(any_starts) >= 6 and not any_starts <= set(records[0].starts)
    assert all(3 <= z <= 8 for z, _, _ in lesion_starts) and len(lesion_starts) >= 3  # a patch holding z 10..13 starts at 3..8
    again = ScanDataset(records, "train", lesion_patch_prob=1.0, seed=0, patch_sampling="random")
    again.set_epoch(59)
    assert [again.choose_patch(i) for i in range(len(records))] == [lesion_only.choose_patch(i) for i in range(len(records))]
    with pytest.raises(ConfigError, match="patch_sampling"):
        ScanDataset(records, "train", patch_sampling="jitter")


def test_eval_items_are_whole_scans(cohort):
    from deepsc.train.dataset import ScanDataset, read_cohort

    dataset = ScanDataset(read_cohort(*cohort, "test"), "eval")
    item = dataset[0]
    assert item["case_id"] == "p1" and item["image"].shape == (1, *SCAN_SHAPE)
    assert item["lesion"].shape == (1, *SCAN_SHAPE) and item["lesion"].sum() > 0
    with pytest.raises(ConfigError, match="lesion_patch_prob"):
        ScanDataset(dataset.records, "train", lesion_patch_prob=1.5)


# --------------------------------------------------------------------------- stages (DeepSC, MLflow)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The three stages on the tiny cohort, one epoch each (shared by the tests below)."""
    from deepsc.train.stages import train_stage

    root = tmp_path_factory.mktemp("stages")
    pre, split = write_tiny_cohort(root)
    params = tiny_params(root)
    seg = train_stage("pretrain-seg", pre, split, root / "seg", params, progress=False)
    cls = train_stage("pretrain-cls", pre, split, root / "cls", params, progress=False)
    joint = train_stage("finetune", pre, split, root / "joint", params, {"seg": seg, "cls": cls}, progress=False)
    return {"root": root, "pre": pre, "split": split, "params": params, "seg": seg, "cls": cls, "joint": joint}


def _state(folder: Path) -> dict:
    import torch

    return torch.load(folder / "model.pt", weights_only=True)


def test_stages_write_their_folder_and_one_mlflow_run_each(trained):
    import mlflow

    from deepsc.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(trained["params"]))
    for name, stage, metric in (("seg", "pretrain-seg", "dice"), ("cls", "pretrain-cls", "accuracy"), ("joint", "finetune", "loss_ta")):
        folder = trained[name]
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "history.csv", "last.pt", "model.pt", "run.json"]
        config = json.loads((folder / "config.json").read_text())
        assert config["stage"] == stage and config["class_counts"] == [3, 1, 2]
        run = client.get_run(json.loads((folder / "run.json").read_text())["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["stage"] == stage
        assert metric in run.data.metrics and "lr" in run.data.metrics
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model.pt", "config.json", "history.csv", "last.pt"}


def test_pretraining_trains_only_its_own_path(trained):
    import torch

    from deepsc.train.stages import prepare_stage

    untrained = prepare_stage("pretrain-seg", trained["pre"], trained["split"], trained["params"]).model.state_dict()
    seg, cls = _state(trained["seg"]), _state(trained["cls"])
    changed = lambda state, prefix: any(not torch.equal(v, untrained[k]) for k, v in state.items() if k.startswith(prefix))  # noqa: E731
    unchanged = lambda state, prefix: all(torch.equal(v, untrained[k]) for k, v in state.items() if k.startswith(prefix))  # noqa: E731
    assert changed(seg, "lesion.") and unchanged(seg, "classifier.") and unchanged(seg, "cls_stem.")
    assert changed(cls, "classifier.") and unchanged(cls, "lesion.") and unchanged(cls, "seg_stem.")


def test_each_stage_draws_patches_as_its_own_block_says(trained):
    from deepsc.config import apply_overrides
    from deepsc.train.dataset import patch_sampling_setting
    from deepsc.train.stages import prepare_stage

    train = trained["params"]["train"]
    params = apply_overrides(trained["params"], {"train.pretrain_seg": {**train["pretrain_seg"], "patch_sampling": "random"},
                                                 "train.finetune": {**train["finetune"], "patch_sampling": "grid"}})
    seg = prepare_stage("pretrain-seg", trained["pre"], trained["split"], params)
    joint = prepare_stage("finetune", trained["pre"], trained["split"], params, {"seg": trained["seg"], "cls": trained["cls"]})
    assert (seg.dataset.patch_sampling, joint.dataset.patch_sampling) == ("random", "grid")
    assert patch_sampling_setting({"train": {"pretrain_cls": {"epochs": 1}}}, "pretrain_cls") == "grid"  # absent: the tiles
    with pytest.raises(ConfigError, match="train.finetune.patch_sampling"):
        patch_sampling_setting({"train": {"finetune": {"patch_sampling": "jitter"}}}, "finetune")


def test_finetune_starts_from_both_stage1_models_and_trains_the_cross_stitch(trained):
    import torch

    from deepsc.train.stages import prepare_stage

    start = prepare_stage("finetune", trained["pre"], trained["split"], trained["params"],
                          {"seg": trained["seg"], "cls": trained["cls"]}).model.state_dict()
    seg, cls = _state(trained["seg"]), _state(trained["cls"])
    assert all(torch.equal(start[k], seg[k]) for k in start if k.startswith(("lesion.", "seg_stem.")))
    assert all(torch.equal(start[k], cls[k]) for k in start if k.startswith(("classifier.", "cls_stem.")))
    joint = _state(trained["joint"])
    stitch = [k for k in joint if k.startswith("cross_stitch.")]
    assert stitch and all(not torch.equal(joint[k], start[k]) for k in stitch)


def test_joint_finetune_completes_the_lesion_map_with_the_stage1_segmentation(trained):
    """train.lesion_context: predicted (default) -> each scan's whole-scan stage-1 prediction on
    the cls grid, also for a scan without a mask; reference -> the masks (unknown: not known)."""
    import numpy as np
    import torch

    from deepsc.config import apply_overrides
    from deepsc.errors import ConfigError
    from deepsc.inference import Predictor
    from deepsc.train.dataset import lesion_on_cls_grid
    from deepsc.train.stages import prepare_stage

    stage1 = {"seg": trained["seg"], "cls": trained["cls"]}
    unflipped = apply_overrides(trained["params"], {"train.flip_prob": 0.0})
    predicted = prepare_stage("finetune", trained["pre"], trained["split"], unflipped, stage1).dataset
    # the plain grid, as the classifier's lesion input at inference (DeepSC.infer_scan: the tiles)
    segmenter = Predictor.from_dir(trained["seg"], device="cpu", mirror=False, overlap=0.0)
    for index, record in enumerate(predicted.records):
        image = np.load(record.case_dir / "image.npy").astype(np.float32)
        want = lesion_on_cls_grid(segmenter.predict_case(image, np.zeros(CLS_SHAPE, np.float32)).lesion_prob, CLS_SHAPE)
        item = predicted[index]
        np.testing.assert_allclose(item["lesion_cls"][0].numpy(), want, atol=1e-5)
        assert bool(item["context_known"])
    reference = prepare_stage("finetune", trained["pre"], trained["split"],
                              apply_overrides(trained["params"], {"train.lesion_context": "reference"}), stage1).dataset
    unknown = [i for i, r in enumerate(reference.records) if not r.has_mask]
    assert unknown and not bool(reference[unknown[0]]["context_known"])
    assert torch.equal(reference[unknown[0]]["lesion_cls"], torch.zeros(1, *CLS_SHAPE))
    with pytest.raises(ConfigError, match="lesion_context"):
        prepare_stage("finetune", trained["pre"], trained["split"],
                      apply_overrides(trained["params"], {"train.lesion_context": "oracle"}), stage1)


def _cls_context(params: dict, source: str) -> dict:
    """``params`` with ``train.pretrain_cls.lesion_context: source`` (tiny_params replaces the section)."""
    import copy

    params = copy.deepcopy(params)
    params["train"]["pretrain_cls"]["lesion_context"] = source
    return params


def test_stage1_classifier_reads_the_stage1_segmentation_only_when_told(trained):
    """train.pretrain_cls.lesion_context: predicted -> the pretrain-seg folder's whole-scan maps
    (the ones fine-tuning reads) for every training scan, its weights part of the run's identity;
    reference (default) -> the masks, and a pretrain-seg folder passed anyway is not read."""
    import numpy as np

    from deepsc.config import apply_overrides
    from deepsc.train.stages import prepare_stage

    args = (trained["pre"], trained["split"])
    predicted_params = _cls_context(trained["params"], "predicted")
    predicted = prepare_stage("pretrain-cls", *args, predicted_params, {"seg": trained["seg"]})
    finetune = prepare_stage("finetune", *args, trained["params"], {"seg": trained["seg"], "cls": trained["cls"]})
    assert predicted.dataset.lesion_context.keys() == {r.case_id for r in predicted.dataset.records}
    for case_id, lesion_map in finetune.dataset.lesion_context.items():
        np.testing.assert_array_equal(predicted.dataset.lesion_context[case_id], lesion_map)
    assert set(predicted.config["init_sha256"]) == {"seg"}

    reference = prepare_stage("pretrain-cls", *args, trained["params"], {"seg": trained["seg"]})
    assert reference.dataset.lesion_context == {} and reference.config["init_sha256"] == {}
    image_only = apply_overrides(predicted_params, {"train.task": "cls"})  # w/o Seg never gets a map
    assert prepare_stage("pretrain-cls", *args, image_only, {"seg": trained["seg"]}).dataset.lesion_context == {}
    with pytest.raises(ConfigError, match="--seg-init"):
        prepare_stage("pretrain-cls", *args, predicted_params)
    with pytest.raises(InputError, match="pretrain-seg"):
        prepare_stage("pretrain-cls", *args, predicted_params, {"seg": trained["cls"]})
    with pytest.raises(ConfigError, match="pretrain_cls.lesion_context"):
        prepare_stage("pretrain-cls", *args, _cls_context(trained["params"], "oracle"))
    with pytest.raises(ConfigError, match="trains from scratch"):
        prepare_stage("pretrain-seg", *args, trained["params"], {"seg": trained["seg"]})


def test_stage1_classifier_on_reference_masks_ignores_a_given_segmentation(trained, tmp_path):
    """dvc.yaml always passes --seg-init to pretrain-cls: with reference masks the run must end
    with the weights of a run without it."""
    import torch

    from deepsc.train.stages import train_stage

    out = train_stage("pretrain-cls", trained["pre"], trained["split"], tmp_path / "cls", trained["params"],
                      {"seg": trained["seg"]}, progress=False)
    assert all(torch.equal(v, _state(trained["cls"])[k]) for k, v in _state(out).items())


def test_segmenting_the_training_scans_leaves_the_stage_seed_alone(trained):
    """pretrain-cls on predicted maps segments the scans (building a model) before it seeds
    itself: its initial weights and random state are those of the reference-mask run."""
    import torch

    from deepsc.train import stages

    stages._CONTEXT_CACHE.clear()
    predicted = stages.prepare_stage("pretrain-cls", trained["pre"], trained["split"], _cls_context(trained["params"], "predicted"),
                                     {"seg": trained["seg"]})
    after_predicted = torch.random.get_rng_state()
    reference = stages.prepare_stage("pretrain-cls", trained["pre"], trained["split"], trained["params"])
    assert predicted.dataset.lesion_context and torch.equal(after_predicted, torch.random.get_rng_state())
    assert all(torch.equal(v, reference.model.state_dict()[k]) for k, v in predicted.model.state_dict().items())


def test_variants_sharing_a_stage1_segmentation_reuse_its_lesion_maps(trained, monkeypatch, tmp_path):
    """The ablation grid fine-tunes variant after variant from one pretrain-seg folder: its
    whole-scan predictions are computed once, and again when the weights change."""
    import shutil

    import torch

    from deepsc.config import apply_overrides
    from deepsc.train import dataset, stages

    calls = []
    real = dataset.predicted_lesion_context
    monkeypatch.setattr(dataset, "predicted_lesion_context", lambda *a, **k: calls.append(1) or real(*a, **k))
    stages._CONTEXT_CACHE.clear()
    stage1 = {"seg": trained["seg"], "cls": trained["cls"]}
    first = stages.prepare_stage("finetune", trained["pre"], trained["split"], trained["params"], stage1).dataset
    lambda0 = apply_overrides(trained["params"], {"loss.lambda_ta": 0.0})
    again = stages.prepare_stage("finetune", trained["pre"], trained["split"], lambda0, stage1).dataset
    assert len(calls) == 1 and again.lesion_context.keys() == first.lesion_context.keys()
    other = tmp_path / "seg"
    shutil.copytree(trained["seg"], other)
    state = torch.load(other / "model.pt", weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, other / "model.pt")
    stages.prepare_stage("finetune", trained["pre"], trained["split"], lambda0, {"seg": other, "cls": trained["cls"]})
    assert len(calls) == 2


def test_a_stage_rerun_after_a_code_change_trains_anew(trained, tmp_path, monkeypatch, caplog):
    """dvc re-runs a stage whose sources changed, in a persisted folder that still holds the
    finished checkpoint: it must train with the new code, not resume the old model."""
    import shutil

    from deepsc.train import stages

    folder = tmp_path / "seg"
    shutil.copytree(trained["seg"], folder)
    with caplog.at_level("INFO"):
        stages.train_stage("pretrain-seg", trained["pre"], trained["split"], folder, trained["params"], progress=False)
    assert "resuming" in caplog.text and "starts over" not in caplog.text
    caplog.clear()
    monkeypatch.setattr(stages, "code_key", lambda stage: "edited")
    with caplog.at_level("WARNING"):
        stages.train_stage("pretrain-seg", trained["pre"], trained["split"], folder, trained["params"], progress=False)
    assert "code_key" in caplog.text and "starts over" in caplog.text
    assert json.loads((folder / "config.json").read_text())["code_key"] == "edited"


@pytest.mark.parametrize("stage, source", [("pretrain-seg", "model/network.py"), ("pretrain-cls", "train/engine.py"),
                                           ("baseline-unet", "data/patches.py"), ("finetune", "data/preprocess.py"),
                                           ("finetune", "inference.py"), ("pretrain-cls", "inference.py")])
def test_code_key_covers_the_training_sources(stage, source, monkeypatch):
    """An edit to any file the stage trains with gives another code key; others leave it."""
    import pathlib

    from deepsc.train.stages import code_key

    before = code_key.__wrapped__(stage)
    real = pathlib.Path.read_bytes

    def edit(path):
        monkeypatch.setattr(pathlib.Path, "read_bytes",
                            lambda self: real(self) + (b"# edited" if self.as_posix().endswith("deepsc/" + path) else b""))

    edit("evaluate.py")
    assert code_key.__wrapped__(stage) == before
    if stage not in ("finetune", "pretrain-cls"):
        edit("inference.py")  # stage-1 segmentation and the baselines never segment whole scans
        assert code_key.__wrapped__(stage) == before
    edit(source)
    assert code_key.__wrapped__(stage) != before


# dvc.yaml training stage -> the stages it trains (the ablation grid pre-trains and fine-tunes)
DVC_TRAINING_STAGES = {"pretrain_seg": ["pretrain-seg"], "pretrain_cls": ["pretrain-cls"], "finetune": ["finetune"],
                       "ablation": ["pretrain-seg", "pretrain-cls", "finetune"], "baselines": ["baseline-unet", "baseline-classifier"]}


@pytest.mark.parametrize("dvc_stage", sorted(DVC_TRAINING_STAGES))
def test_dvc_training_stages_declare_the_code_and_settings_their_models_depend_on(dvc_stage):
    """What dvc watches is what the resume/skip identity hashes: a change dvc misses leaves a
    model that does not match the code or params.yaml, and dvc would call it up to date."""
    import yaml

    from deepsc.train.baselines import BASELINE_SETTINGS
    from deepsc.train.stages import STAGE_SECTION, STAGE_SETTINGS, code_sources

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"][dvc_stage]
    deps, declared = set(spec["deps"]), [str(p) for p in spec["params"]]
    assert "outputs/preprocessed" in deps and "outputs/split.csv" in deps
    for stage in DVC_TRAINING_STAGES[dvc_stage]:
        assert {f"deepsc/{source}" for source in code_sources(stage)} <= deps, stage
        if stage.startswith("baseline-"):
            engine = ("baselines.epochs", "baselines.lr", "baselines.batch_size", "train.pretrain_seg", "train.pretrain_cls",
                      "train.finetune")
            settings = (*BASELINE_SETTINGS[stage.split("-", 1)[1]], *engine)
        else:
            settings = (*STAGE_SETTINGS[stage], f"train.{STAGE_SECTION[stage]}")
            settings += ("train.task",) if stage == "pretrain-cls" else ()  # image-only w/o Seg
        # preprocess settings reach a stage through its outputs/preprocessed dep
        wanted = [key for key in (*settings, "train.seed", "train.amp") if not key.startswith("preprocess")]
        missing = [key for key in wanted if not any(key == p or key.startswith(p + ".") for p in declared)]
        assert not missing, f"{dvc_stage} ({stage}) does not declare {missing}"


def test_single_task_finetune_keeps_the_other_path(trained, tmp_path):
    import torch

    from deepsc.config import apply_overrides
    from deepsc.train.stages import train_stage

    params = apply_overrides(trained["params"], {"train.task": "seg"})
    folder = train_stage("finetune", trained["pre"], trained["split"], tmp_path / "seg_only", params,
                         {"seg": trained["seg"], "cls": trained["cls"]}, progress=False)
    state, cls = _state(folder), _state(trained["cls"])
    assert all(torch.equal(state[k], cls[k]) for k in cls if k.startswith("classifier."))
    assert json.loads((folder / "config.json").read_text())["task"] == "seg"
    assert "loss_cls" not in (folder / "history.csv").read_text().splitlines()[0]


def test_load_model_rebuilds_a_trained_folder(trained):
    import torch

    from deepsc.train.stages import load_model

    model, config = load_model(trained["joint"])
    assert config["stage"] == "finetune" and not model.training
    assert all(torch.equal(v, _state(trained["joint"])[k]) for k, v in model.state_dict().items())


def test_finetune_refuses_missing_or_wrong_stage1_folders(trained):
    from deepsc.train.stages import prepare_stage

    args = (trained["pre"], trained["split"], trained["params"])
    with pytest.raises(ConfigError, match="--seg-init"):
        prepare_stage("finetune", *args, {"seg": trained["seg"]})
    with pytest.raises(InputError, match="pretrain-seg"):
        prepare_stage("finetune", *args, {"seg": trained["cls"], "cls": trained["cls"]})
    with pytest.raises(ConfigError, match="unknown stage"):
        prepare_stage("pretrain", *args)


def test_cli_trains_a_stage(trained, tmp_path, capsys):
    import yaml

    from deepsc.cli import main

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(trained["params"]))
    out = tmp_path / "cli_cls"
    code = main(["--params", str(params_file), "train", "--stage", "pretrain-cls", "--preprocessed", str(trained["pre"]),
                 "--split", str(trained["split"]), "--out", str(out), "--no-progress"])
    assert code == 0 and (out / "model.pt").is_file()
    code = main(["--params", str(params_file), "train", "--stage", "finetune", "--preprocessed", str(trained["pre"]),
                 "--split", str(trained["split"]), "--out", str(tmp_path / "x"), "--seg-init", str(out)])
    assert code != 0 and "--cls-init" in capsys.readouterr().err


@pytest.mark.parametrize("kind, metric", [("unet", "dice"), ("classifier", "accuracy")])
def test_baselines_train_with_the_same_engine(trained, tmp_path, kind, metric):
    import torch

    from deepsc.config import apply_overrides
    from deepsc.train.baselines import train_baseline
    from deepsc.train.stages import load_model

    params = apply_overrides(trained["params"], {"baselines.epochs": 1, "baselines.unet_channels": [4, 8, 16]})
    folder = train_baseline(kind, trained["pre"], trained["split"], tmp_path / kind, params, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "history.csv", "last.pt", "model.pt", "run.json"]
    assert metric in (folder / "history.csv").read_text().splitlines()[0]
    model, config = load_model(folder)
    assert config["kind"] == kind and config["architecture"] == ("unet" if kind == "unet" else "resnet18")
    shape = (1, 1, *PATCH) if kind == "unet" else (1, 1, *CLS_SHAPE)
    assert model(torch.zeros(shape)).shape == ((1, 1, *PATCH) if kind == "unet" else (1, 3))


def test_a_baseline_rerun_with_another_architecture_trains_anew(trained, tmp_path, caplog):
    """dvc re-runs the baselines after ``baselines.unet_channels`` changes, in the persisted
    folder of the old network: the old checkpoint is set aside, not loaded into the new shapes."""
    import torch

    from deepsc.config import apply_overrides
    from deepsc.train.baselines import baseline_settings_key, train_baseline

    params = apply_overrides(trained["params"], {"baselines.epochs": 1, "baselines.unet_channels": [4, 8, 16]})
    folder = train_baseline("unet", trained["pre"], trained["split"], tmp_path / "unet", params, progress=False)
    wider = apply_overrides(params, {"baselines.unet_channels": [8, 16, 32]})
    assert baseline_settings_key("unet", wider) != baseline_settings_key("unet", params)
    assert baseline_settings_key("classifier", wider) == baseline_settings_key("classifier", params)
    with caplog.at_level("WARNING"):
        train_baseline("unet", trained["pre"], trained["split"], folder, wider, progress=False)
    assert "settings_key" in caplog.text and "starts over" in caplog.text
    first_conv = [v for k, v in torch.load(folder / "model.pt", weights_only=True).items() if v.ndim == 5][0]
    assert first_conv.shape[0] == 8
    caplog.clear()
    with caplog.at_level("WARNING"):  # the loss it trains with counts as well
        train_baseline("unet", trained["pre"], trained["split"], folder, apply_overrides(wider, {"loss.focal_gamma": 0.0}),
                       progress=False)
    assert "starts over" in caplog.text


def test_baselines_get_the_epochs_of_the_deepsc_path_they_replace(params):
    from deepsc.config import apply_overrides
    from deepsc.train.baselines import baseline_epochs, engine_config

    train = params["train"]
    assert params["baselines"]["epochs"] is None
    assert baseline_epochs("unet", params) == train["pretrain_seg"]["epochs"] + train["finetune"]["epochs"]
    assert engine_config(params, "classifier").epochs == train["pretrain_cls"]["epochs"] + train["finetune"]["epochs"]
    assert baseline_epochs("unet", apply_overrides(params, {"baselines.epochs": 7})) == 7
    del params["train"]["pretrain_seg"]
    with pytest.raises(ConfigError, match="pretrain_seg"):
        baseline_epochs("unet", params)
    with pytest.raises(ConfigError, match="baseline must be"):
        baseline_epochs("svm", params)


def test_mirror_left_right_flips_inputs_and_box_together():
    import torch

    from deepsc.train.dataset import mirror_left_right

    patch = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    item = {"cls": patch.clone(), "patch": patch.clone(), "lesion": (patch > 20).float(),
            "box": torch.tensor([0.0, 0.5, 0.75, 0.5, 1.0, 1.25]), "label": torch.tensor(1)}
    mirrored = mirror_left_right(item)
    assert torch.equal(mirrored["patch"][..., 0], patch[..., -1])
    assert torch.equal(mirrored["lesion"], torch.flip(item["lesion"], dims=(-1,)))
    # x range [0.75, 1.25) (a zero-padded edge patch) becomes [-0.25, 0.25); z and y untouched
    assert torch.allclose(mirrored["box"], torch.tensor([0.0, 0.5, -0.25, 0.5, 1.0, 0.25]))
    assert torch.equal(item["box"], torch.tensor([0.0, 0.5, 0.75, 0.5, 1.0, 1.25])), "input left unchanged"
    assert torch.equal(mirrored["label"], item["label"])


def test_mirrored_box_with_negative_start_reads_the_right_scan_region():
    import torch

    from deepsc.model.coords import crop_from_grid

    scan = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 1, 8).expand(1, 1, 2, 2, 8).contiguous()
    right_edge = crop_from_grid(scan, torch.tensor([[0.0, 0.0, 0.75, 1.0, 1.0, 1.25]]), (2, 2, 4))
    mirrored_scan = torch.flip(scan, dims=(-1,))
    left_edge = crop_from_grid(mirrored_scan, torch.tensor([[0.0, 0.0, -0.25, 1.0, 1.0, 0.25]]), (2, 2, 4))
    assert torch.allclose(torch.flip(left_edge, dims=(-1,)), right_edge)


def test_only_models_that_segment_learn_from_whole_scan_lesion_maps():
    from deepsc.train.stages import stage_plan

    assert stage_plan("finetune", {"train": {"task": "joint"}}).teacher_forcing
    assert stage_plan("pretrain-cls", {}).teacher_forcing  # fine-tuned jointly afterwards
    assert not stage_plan("finetune", {"train": {"task": "cls"}}).teacher_forcing  # w/o Seg: no map at inference
    assert not stage_plan("pretrain-cls", {"train": {"task": "cls"}}).teacher_forcing  # nor in stage 1
    assert not stage_plan("pretrain-seg", {}).teacher_forcing


def test_single_task_classifier_is_pretrained_without_lesion_masks(trained):
    """w/o Seg (train.task: cls) is an image-only classifier in both stages: its stage-1 logits
    do not move when the reference lesion map changes; DeepSC's stage-1 classifier's do."""
    import torch

    from torch.utils.data import default_collate

    from deepsc.config import apply_overrides
    from deepsc.train.stages import prepare_stage

    image_only = prepare_stage("pretrain-cls", trained["pre"], trained["split"],
                               apply_overrides(trained["params"], {"train.task": "cls"}))
    joint = prepare_stage("pretrain-cls", trained["pre"], trained["split"], trained["params"])
    assert image_only.plan.image_only and image_only.config["image_only"] and not joint.plan.image_only
    batch = default_collate([joint.dataset[i] for i in range(2)])
    masked = dict(batch, lesion_cls=torch.ones_like(batch["lesion_cls"]), context_known=torch.ones(2, dtype=torch.bool))
    emptied = dict(masked, lesion_cls=torch.zeros_like(batch["lesion_cls"]))
    model = joint.model.eval()
    with torch.no_grad():
        logits = lambda stage, b: stage.adapter.forward(model, b)["cls_logit"]  # noqa: E731
        assert torch.equal(logits(image_only, masked), logits(image_only, emptied))
        assert not torch.allclose(logits(joint, masked), logits(joint, emptied))
