"""deepsc.data.manifest: validation with every problem reported, round trips, importers, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import broken_inputs as bi
from deepsc.data.manifest import (
    MANIFEST_COLUMNS,
    import_cohort,
    import_covid_ct_md,
    import_nifti_folder,
    load_manifest,
    write_manifest,
)
from deepsc.errors import InputError


def _cohort(folder: Path) -> Path:
    """Three tiny NIfTI scans (one with a mask) and a manifest with relative paths."""
    images = folder / "images"
    for name in ("a", "b", "c"):
        bi.write_nifti(images / f"{name}.nii.gz", bi.ct_phantom((4, 8, 8)))
    bi.write_nifti(folder / "masks" / "a.nii.gz", np.zeros((4, 8, 8), np.uint8))
    manifest = folder / "manifest.csv"
    manifest.write_text(
        "case_id,label,image_path,mask_path\n"
        "a,COVID,images/a.nii.gz,masks/a.nii.gz\n"
        "b, cap ,images/b.nii.gz,\n"
        f"c,normal,{images / 'c.nii.gz'},\n"
    )
    return manifest


def test_load_manifest_resolves_paths_and_fills_optional_columns(tmp_path: Path) -> None:
    frame = load_manifest(_cohort(tmp_path))
    assert list(frame.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert list(frame["label"]) == ["covid", "cap", "normal"]
    assert frame.loc[0, "image_path"] == str(tmp_path / "images" / "a.nii.gz")
    assert frame.loc[0, "mask_path"] == str(tmp_path / "masks" / "a.nii.gz")
    assert frame.loc[1, "mask_path"] == "" and frame.loc[2, "lung_path"] == "" and frame.loc[2, "source"] == ""
    assert all(Path(p).is_absolute() for p in frame["image_path"])


def test_load_manifest_reports_every_problem_at_once(tmp_path: Path) -> None:
    item = bi.write_manifest_bad_rows(tmp_path)
    with pytest.raises(InputError) as caught:
        load_manifest(item.path)
    message = str(caught.value)
    assert "6 problem(s)" in message
    assert "rows 1, 2, 3, 5, 6 (cases 'case_a', 'case_a', 'case_b', 'case d', '..') name the same image" in message
    assert "row 6 (case '..'): case_id may hold only letters, digits, '.', '_' and '-', and may not start with '.'" in message
    assert "row 3 (case 'case_b'): label 'flu'" in message
    assert "row 4 (case 'case_c'): image_path not found" in message
    assert "row 5 (case 'case d'): case_id may hold only" in message
    assert "'case_a' appears in rows 1, 2" in message


def test_one_image_named_by_two_rows_is_refused(tmp_path: Path) -> None:
    """The same scan under two ids (spelt differently, or through a link) could be in train and test."""
    bi.write_nifti(tmp_path / "images" / "a.nii.gz", bi.ct_phantom((4, 8, 8)))
    (tmp_path / "alias").symlink_to(tmp_path / "images")
    path = tmp_path / "m.csv"
    path.write_text("case_id,label,image_path\nfirst,covid,images/a.nii.gz\nsecond,normal,./images/../images/a.nii.gz\n"
                    "third,cap,alias/a.nii.gz\n")
    for check_files in (True, False):
        with pytest.raises(InputError, match=r"(?s)1 problem.*rows 1, 2, 3 \(cases 'first', 'second', 'third'\) name the same image"):
            load_manifest(path, check_files=check_files)


def test_case_ids_differing_only_in_letter_case_are_refused(tmp_path: Path) -> None:
    """``Case_01`` and ``case_01`` would share one output folder on macOS or a Windows share."""
    path = tmp_path / "m.csv"
    path.write_text("case_id,label,image_path\nCase_01,covid,a.nii.gz\nb,normal,b.nii.gz\ncase_01,cap,c.nii.gz\n"
                    "CASE_01,normal,d.nii.gz\nCASE_01,normal,e.nii.gz\nx,covid,f.nii.gz\nx,covid,g.nii.gz\n")
    with pytest.raises(InputError) as caught:
        load_manifest(path, check_files=False)
    message = str(caught.value)
    assert "3 problem(s)" in message  # CASE_01 twice, x twice, the Case_01 / case_01 / CASE_01 group once
    assert "case_id 'CASE_01' appears in rows 4, 5: ids must be unique" in message
    assert "case_id 'x' appears in rows 6, 7: ids must be unique" in message
    assert ("case_ids 'Case_01' (row 1), 'case_01' (row 3), 'CASE_01' (rows 4, 5) differ only in letter case: "
            "they would share one output folder on a case-insensitive file system") in message
    path.write_text("case_id,label,image_path\nCase_01,covid,a.nii.gz\ncase_02,normal,b.nii.gz\n")
    assert list(load_manifest(path, check_files=False)["case_id"]) == ["Case_01", "case_02"]


def test_a_dicom_file_and_its_series_folder_are_one_image(tmp_path: Path) -> None:
    """read_ct reads a DICOM file's whole series from its folder: the folder, a file in it (with
    or without a .dcm suffix, also through a linked folder) name one scan. Other formats keep
    their file as the image."""
    series = tmp_path / "series"
    bi.write_dicom_series(series, bi.ct_phantom((4, 8, 8)), file_names=["IM0001.dcm", "IM0002.dcm", "IM0003", "IM0004.dcm"])
    (tmp_path / "alias").symlink_to(series)
    bi.write_nifti(tmp_path / "series_copy" / "a.nii.gz", bi.ct_phantom((4, 8, 8)))
    bi.write_nifti(tmp_path / "series_copy" / "b.nii.gz", bi.ct_phantom((4, 8, 8)))
    path = tmp_path / "m.csv"
    path.write_text("case_id,label,image_path\nfolder,covid,series\nfile,covid,series/IM0002.dcm\n"
                    "bare,cap,series/IM0003\nlinked,normal,alias/IM0004.dcm\n"
                    "nifti_a,normal,series_copy/a.nii.gz\nnifti_b,normal,series_copy/b.nii.gz\n")
    for check_files in (True, False):
        with pytest.raises(InputError) as caught:
            load_manifest(path, check_files=check_files)
        message = str(caught.value)
        assert "1 problem(s)" in message
        assert f"rows 1, 2, 3, 4 (cases 'folder', 'file', 'bare', 'linked') name the same image {series}:" in message


def test_patient_id_is_optional_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("case_id,label,image_path,patient_id\na,covid,a.nii.gz, P1 \nb,NORMAL,b.nii.gz,\n")
    frame = load_manifest(path, check_files=False)
    assert list(frame["patient_id"]) == ["P1", ""] and list(frame["label"]) == ["covid", "normal"]
    assert "patient_id" not in load_manifest(_cohort(tmp_path / "plain")).columns


def test_resolve_path_collapses_dot_dot_before_links(tmp_path: Path) -> None:
    """``link/..`` is the manifest's folder, not the link target's parent: one rule for everyone."""
    from deepsc.data.manifest import manifest_folder, resolve_path

    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link").symlink_to(tmp_path / "elsewhere" / "deep")
    base = manifest_folder(tmp_path / "data" / "manifest.csv")
    assert resolve_path("link/../a.nii.gz", base) == str(tmp_path / "data" / "a.nii.gz")
    assert resolve_path("", base) == ""


def test_a_home_folder_of_an_unknown_user_is_a_missing_file(tmp_path: Path) -> None:
    """``~nosuchuser/...`` (a manifest from another machine) is named, not a RuntimeError."""
    path = tmp_path / "m.csv"
    path.write_text("case_id,label,image_path\ncase_a,normal,~deepsc-no-such-user/a.nii.gz\n")
    with pytest.raises(InputError, match=r"row 1 \(case 'case_a'\): image_path not found.*~deepsc-no-such-user"):
        load_manifest(path)


def test_load_manifest_without_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("case_id,label,image_path\nx,normal,nowhere.nii.gz\n")
    assert load_manifest(path, check_files=False).loc[0, "image_path"] == str(tmp_path / "nowhere.nii.gz")
    with pytest.raises(InputError, match="image_path not found"):
        load_manifest(path)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("case_id,image_path\na,a.nii.gz\n", r"missing column\(s\) label"),
        ("", "not a readable CSV"),
        ("case_id,label,image_path\n", "no rows"),
        ("case_id,label,image_path\n,covid,\n", r"(?s)empty case_id.*empty image_path"),
    ],
)
def test_load_manifest_refuses_malformed_files(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=problem):
        load_manifest(path, check_files=False)
    with pytest.raises(InputError, match="not found"):
        load_manifest(tmp_path / "absent.csv")


def test_write_manifest_round_trip_is_relative_and_deterministic(tmp_path: Path) -> None:
    frame = load_manifest(_cohort(tmp_path))
    frame["extra"] = ["1", "2", "3"]
    out = tmp_path / "sub" / "manifest.csv"
    write_manifest(frame, out)
    first = out.read_bytes()
    text = first.decode()
    assert text.splitlines()[0] == "case_id,label,image_path,mask_path,lung_path,source,extra"
    assert "../images/a.nii.gz" in text and str(tmp_path) not in text
    again = load_manifest(out)
    pd.testing.assert_frame_equal(again, frame, check_like=False)
    write_manifest(again, out)
    assert out.read_bytes() == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["manifest.csv"]  # no temporary leftovers


# --------------------------------------------------------------------------- importers


def _covid_ct_md_tree(root: Path) -> None:
    for folder, subjects in (("COVID-19 subjects", ["P001", "P002"]), ("CAP subjects", ["cap001"]), ("Normal subjects", ["normal001"])):
        for subject in subjects:
            bi.write_dicom_series(root / folder / subject, bi.ct_phantom((3, 8, 8)), patient_id=subject)
    (root / "Index.csv").write_text("not part of the layout\n")


def test_import_covid_ct_md(tmp_path: Path) -> None:
    from deepsc.data.io import read_ct

    _covid_ct_md_tree(tmp_path / "ds")
    frame = import_covid_ct_md(tmp_path / "ds")
    assert dict(zip(frame["case_id"], frame["label"])) == {"cap001": "cap", "P001": "covid", "P002": "covid", "normal001": "normal"}
    assert set(frame["mask_path"]) == {""} and set(frame["source"]) == {"COVID-CT-MD"}
    assert read_ct(frame.loc[0, "image_path"]).shape == (3, 8, 8)


def test_import_covid_ct_md_refuses_wrong_layouts(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    with pytest.raises(InputError, match="no COVID-CT-MD class folder"):
        import_covid_ct_md(tmp_path / "flat")
    (tmp_path / "ds" / "CAP subjects" / "cap009").mkdir(parents=True)
    with pytest.raises(InputError, match=r"cap009: no files"):
        import_covid_ct_md(tmp_path / "ds")
    with pytest.raises(InputError, match="not found"):
        import_covid_ct_md(tmp_path / "absent")


def _nnunet_tree(root: Path) -> None:
    for case in ("lesion_001", "lesion_002", "lesion_003"):
        bi.write_nifti(root / "imagesTr" / f"{case}_0000.nii.gz", bi.ct_phantom((4, 8, 8)))
    for case in ("lesion_001", "lesion_002"):
        bi.write_nifti(root / "labelsTr" / f"{case}.nii.gz", np.zeros((4, 8, 8), np.uint8))
    (root / "dataset.json").write_text("{}")


def test_import_nnunet_with_labels_and_default(tmp_path: Path) -> None:
    _nnunet_tree(tmp_path / "ds")
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,label\nlesion_003,CAP\n")
    frame = import_nifti_folder(tmp_path / "ds", labels=labels, default_label="covid")
    assert list(frame["label"]) == ["covid", "covid", "cap"]
    assert frame.loc[0, "mask_path"].endswith("labelsTr/lesion_001.nii.gz") and frame.loc[2, "mask_path"] == ""
    with pytest.raises(InputError, match=r"2 case\(s\) have no class \(lesion_001, lesion_002\)"):
        import_nifti_folder(tmp_path / "ds", labels=labels)
    labels.write_text("case,label\n")
    with pytest.raises(InputError, match="lacks column"):
        import_nifti_folder(tmp_path / "ds", labels=labels)


def test_import_mosmed(tmp_path: Path) -> None:
    root = tmp_path / "mosmed"
    for grade, study in ((0, "study_0001"), (1, "study_0300"), (3, "study_1000")):
        bi.write_nifti(root / "studies" / f"CT-{grade}" / f"{study}.nii.gz", bi.ct_phantom((4, 8, 8)))
    bi.write_nifti(root / "masks" / "study_0300_mask.nii.gz", np.zeros((4, 8, 8), np.uint8))
    frame = import_nifti_folder(root)
    assert dict(zip(frame["case_id"], frame["label"])) == {"study_0001": "normal", "study_0300": "covid", "study_1000": "covid"}
    assert [bool(p) for p in frame["mask_path"]] == [False, True, False]
    with pytest.raises(InputError, match="do not pass labels"):
        import_nifti_folder(root, default_label="covid")
    with pytest.raises(InputError, match="unknown NIfTI layout"):
        import_nifti_folder(root / "studies")


def test_cli_import_writes_a_loadable_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from deepsc import cli

    _covid_ct_md_tree(tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "data" / "manifest.csv"
    assert cli.main(["import", "--layout", "covid-ct-md", "--root", "ds", "--out", str(out)]) == 0
    frame = load_manifest(out)
    assert len(frame) == 4 and "ds/COVID-19 subjects/P001" in out.read_text()
    code = cli.main(["import", "--layout", "nifti", "--root", "ds", "--out", str(tmp_path / "other.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "deepsc: error: ds: unknown NIfTI layout" in err and "Traceback" not in err
    assert not (tmp_path / "other.csv").exists()


def test_import_cohort_refuses_labels_for_covid_ct_md(tmp_path: Path) -> None:
    _covid_ct_md_tree(tmp_path / "ds")
    with pytest.raises(InputError, match="do not pass labels"):
        import_cohort("covid-ct-md", tmp_path / "ds", tmp_path / "m.csv", default_label="covid")
