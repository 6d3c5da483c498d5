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


def test_without_patient_ids_the_split_is_the_case_level_one(tmp_path: Path) -> None:
    """The file made before patient grouping existed (sha256 pinned), with or without the column."""
    import hashlib

    manifest = _manifest(tmp_path / "m.csv")
    make_split(manifest, tmp_path / "a.csv", PARAMS)
    assert hashlib.sha256((tmp_path / "a.csv").read_bytes()).hexdigest() == CASE_LEVEL_SHA256
    table = pd.read_csv(manifest)
    for name, patients in (("empty", [""] * len(table)), ("own", list(table["case_id"]))):
        table.assign(patient_id=patients).to_csv(tmp_path / f"{name}.csv", index=False)
        make_split(tmp_path / f"{name}.csv", tmp_path / f"{name}_split.csv", PARAMS)
        assert (tmp_path / f"{name}_split.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()


CASE_LEVEL_SHA256 = "e1749e13ca81fc308dd0480b7962783c9ab63b10810691385a470336128a6146"


def _patient_manifest(path: Path, reverse: bool = False) -> Path:
    """40 patients per class with 1, 4, 3 or 2 scans each (100 scans per class)."""
    rows = []
    for label in ("covid", "cap", "normal"):
        for patient in range(40):
            for scan in range(1 + (patient * 7) % 4):
                case = f"{label}_p{patient:02d}_s{scan}"
                rows.append((case, label, f"{case}.nii.gz", f"{label}-{patient:02d}"))
    rows = rows[::-1] if reverse else rows
    pd.DataFrame(rows, columns=["case_id", "label", "image_path", "patient_id"]).to_csv(path, index=False)
    return path


def test_scans_of_one_patient_share_subset_and_fold(tmp_path: Path) -> None:
    frame = make_split(_patient_manifest(tmp_path / "m.csv"), tmp_path / "s.csv", PARAMS)
    frame["patient"] = frame["case_id"].str.rsplit("_", n=1).str[0]
    per_patient = frame.groupby("patient")[["subset", "fold"]].nunique()
    assert (per_patient == 1).all().all()  # no patient in both train and test, or in two folds
    for label, group in frame.groupby("label"):
        assert abs((group["subset"] == "test").mean() - 0.25) < 0.03, label  # still stratified
    train = frame[frame["subset"] == "train"]
    per_class = train.groupby(["label", "fold"]).size().unstack()
    assert sorted(train["fold"].unique()) == [0, 1, 2, 3, 4]
    assert (per_class.max(axis=1) - per_class.min(axis=1)).max() <= 3  # balanced within one patient's scans
    make_split(_patient_manifest(tmp_path / "r.csv", reverse=True), tmp_path / "r_split.csv", PARAMS)
    assert (tmp_path / "r_split.csv").read_bytes() == (tmp_path / "s.csv").read_bytes()


def test_a_patient_with_scans_of_two_labels_goes_with_the_majority(caplog: pytest.LogCaptureFixture) -> None:
    ids = ["p1_a", "p1_b", "p1_c"] + [f"n{i}" for i in range(6)] + [f"c{i}" for i in range(6)]
    labels = ["normal", "covid", "covid"] + ["normal"] * 6 + ["covid"] * 6
    patients = ["P1", "P1", "P1"] + [""] * 12
    with caplog.at_level("WARNING", logger="deepsc.data.split"):
        frame = stratified_split(ids, labels, SplitConfig(0.25, 2, 3), patients).set_index("case_id")
    assert "patient P1 has scans of different labels: p1_a (normal), p1_b (covid), p1_c (covid); split as covid" in caplog.text
    assert frame.loc[["p1_a", "p1_b", "p1_c"], "label"].tolist() == ["normal", "covid", "covid"]  # each keeps its label
    assert frame.loc[["p1_a", "p1_b", "p1_c"], ["subset", "fold"]].drop_duplicates().shape[0] == 1
    covid_stratum = ["p1_a", "p1_b", "p1_c"] + [f"c{i}" for i in range(6)]
    assert 1 <= (frame.loc[covid_stratum, "subset"] == "test").sum() <= 3  # target round(9 / 4) = 2, P1 has 3 scans


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
