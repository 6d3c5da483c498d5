"""deepsc.data.split: stratified, deterministic, folds disjoint and covering the train part."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest

from deepsc.data.split import SPLIT_COLUMNS, SplitConfig, make_split, stratified_split
from deepsc.errors import ConfigError, InputError

COUNTS = {"covid": 40, "cap": 30, "normal": 30}
PARAMS = {"split": {"test_fraction": 0.25, "folds": 5, "seed": 7}}


def _manifest(path: Path, reverse: bool = False) -> Path:
    rows = [(f"{label}_{i:03d}", label, f"{label}_{i:03d}.nii.gz") for label, n in COUNTS.items() for i in range(n)]
    if reverse:
        rows = rows[::-1]
    pd.DataFrame(rows, columns=["case_id", "label", "image_path"]).to_csv(path, index=False)
    return path


def test_split_is_stratified(tmp_path: Path) -> None:
    frame = make_split(_manifest(tmp_path / "m.csv"), tmp_path / "split.csv", PARAMS)
    assert list(frame.columns) == list(SPLIT_COLUMNS)
    assert len(frame) == sum(COUNTS.values()) and frame["case_id"].is_unique
    test_counts = frame[frame["subset"] == "test"]["label"].value_counts().to_dict()
    assert test_counts == {"covid": 10, "cap": 8, "normal": 8}  # round(n / 4), halves up
    assert set(frame.loc[frame["subset"] == "test", "fold"]) == {-1}


def test_folds_are_disjoint_cover_train_and_are_stratified(tmp_path: Path) -> None:
    frame = make_split(_manifest(tmp_path / "m.csv"), tmp_path / "split.csv", PARAMS)
    train = frame[frame["subset"] == "train"]
    assert sorted(train["fold"].unique()) == [0, 1, 2, 3, 4]
    assert train.groupby("fold").size().max() - train.groupby("fold").size().min() <= 1
    per_class = train.groupby(["label", "fold"]).size().unstack()
    assert (per_class.max(axis=1) - per_class.min(axis=1)).max() <= 1
    assert per_class.to_numpy().sum() == len(train)  # each train case in exactly one fold


def test_split_file_is_byte_identical_and_independent_of_row_order(tmp_path: Path) -> None:
    make_split(_manifest(tmp_path / "m.csv"), tmp_path / "a.csv", PARAMS)
    make_split(_manifest(tmp_path / "m.csv"), tmp_path / "b.csv", PARAMS)
    make_split(_manifest(tmp_path / "r.csv", reverse=True), tmp_path / "c.csv", PARAMS)
    first = (tmp_path / "a.csv").read_bytes()
    assert first == (tmp_path / "b.csv").read_bytes() == (tmp_path / "c.csv").read_bytes()
    assert first.decode().splitlines()[0] == "case_id,label,subset,fold"
    other = copy.deepcopy(PARAMS)
    other["split"]["seed"] = 8
    make_split(_manifest(tmp_path / "m.csv"), tmp_path / "d.csv", other)
    assert (tmp_path / "d.csv").read_bytes() != first


def test_small_classes_keep_a_train_case() -> None:
    frame = stratified_split(["a", "b", "c"], ["covid", "cap", "cap"], SplitConfig(0.5, 2, 0))
    assert frame.set_index("case_id").loc["a", "subset"] == "train"
    assert sorted(frame.loc[frame["label"] == "cap", "subset"]) == ["test", "train"]


@pytest.mark.parametrize(
    "split",
    [
        {"test_fraction": 1.0, "folds": 5, "seed": 7},
        {"test_fraction": 0.25, "folds": 1, "seed": 7},
        {"test_fraction": 0.25, "folds": 5, "seed": "7"},
        {"test_fraction": 0.25, "folds": 5},
        {"test_fraction": 0.25, "folds": 5, "seed": 7, "stratify": True},
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, split: dict) -> None:
    with pytest.raises(ConfigError):
        make_split(_manifest(tmp_path / "m.csv"), tmp_path / "s.csv", {"split": split})
    assert not (tmp_path / "s.csv").exists()


def test_bad_manifest_is_refused_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("case_id,label,image_path\na,covid,a.nii\na,flu,b.nii\n")
    with pytest.raises(InputError, match=r"(?s)flu.*appears in rows 1, 2"):
        make_split(path, tmp_path / "s.csv", PARAMS)
    assert not (tmp_path / "s.csv").exists()


def test_cli_split_uses_params_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, params: dict) -> None:
    import yaml

    from deepsc import cli

    _manifest(tmp_path / "manifest.csv")
    settings = {"paths": {"manifest": "manifest.csv", "outputs": "out"}, "split": params["split"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["split"]) == 0
    frame = pd.read_csv(tmp_path / "out" / "split.csv")
    assert len(frame) == 100 and set(frame["subset"]) == {"train", "test"}
