"""The synthetic cohort: settings, anatomy, lesions, determinism and safe writing."""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from deepsc.errors import ConfigError, InputError

TINY = {
    "seed": 3,
    "n_covid": 1,
    "n_cap": 1,
    "n_normal": 1,
    "inplane_size": 64,
    "inplane_spacing_mm": [5.0, 5.4],
    "slice_spacing_mm": [8.0, 9.0],
    "noise_hu": 18.0,
}


def tiny_params(**changes) -> dict:
    return {"synth": {**TINY, **changes}}


def load(path: Path, dtype=np.float32):
    import nibabel as nib

    from deepsc.data.volume import from_nibabel

    return from_nibabel(nib.load(path), path.name, dtype)


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory) -> Path:
    from deepsc.data.synth import synthesize_cohort

    return synthesize_cohort(tmp_path_factory.mktemp("synth") / "data", tiny_params())


# --- settings -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_cap": -1}, "n_cap"),
        ({"n_covid": 0, "n_cap": 0, "n_normal": 0}, "empty"),
        ({"inplane_spacing_mm": [3.0, 2.0]}, "inplane_spacing_mm"),
        ({"inplane_size": 64, "inplane_spacing_mm": [2.0, 2.0]}, "field of view"),
        ({"noise_hu": -1.0}, "noise_hu"),
        ({"colour": "red"}, "unknown setting"),
    ],
)
def test_config_rejects_bad_settings(changes, message):
    from deepsc.data.synth import SynthConfig

    with pytest.raises(ConfigError, match=message):
        SynthConfig.from_params({**TINY, **changes})


def test_default_settings_match_params_yaml(params):
    from deepsc.data.synth import SynthConfig

    config = SynthConfig.from_params(params["synth"])
    assert (config.n_covid, config.n_cap, config.n_normal) == (30, 30, 30)
    assert config.labels.count("cap") == 30 and config.labels[0] == "covid"


# --- the cohort on disk -------------------------------------------------------------------

def test_manifest_columns_and_relative_paths(tiny_cohort):
    root = tiny_cohort.parent
    rows = read_manifest(tiny_cohort)
    assert list(rows[0]) == ["case_id", "label", "image_path", "mask_path", "lung_path", "source"]
    assert [r["label"] for r in rows] == ["covid", "cap", "normal"]
    assert len({r["case_id"] for r in rows}) == 3
    for row in rows:
        for key in ("image_path", "lung_path"):
            assert not Path(row[key]).is_absolute() and (root / row[key]).is_file()
        if row["label"] == "normal":
            assert row["mask_path"] == ""
        else:
            assert (root / row["mask_path"]).is_file()
    stamp = json.loads((root / "synth.json").read_text())
    assert stamp["settings"]["seed"] == 3 and len(stamp["content_sha256"]) == 64


def test_volumes_are_canonical_with_real_spacing(tiny_cohort):
    import nibabel as nib

    root = tiny_cohort.parent
    row = read_manifest(tiny_cohort)[0]
    raw = nib.load(root / row["image_path"])
    assert raw.get_data_dtype() == np.int16
    assert nib.aff2axcodes(raw.affine) == ("L", "P", "S")
    assert nib.load(root / row["mask_path"]).get_data_dtype() == np.uint8
    image = load(root / row["image_path"])
    sz, sy, sx = image.spacing
    assert 5.0 <= sx <= 5.4 and sy == pytest.approx(sx) and 8.0 <= sz <= 9.0
    nz = image.shape[0]
    assert 200.0 + 40.0 <= nz * sz <= 280.0 + 75.0 + sz   # lungs plus both margins


def test_anatomy_hounsfield_values(tiny_cohort):
    root = tiny_cohort.parent
    row = [r for r in read_manifest(tiny_cohort) if r["label"] == "normal"][0]
    image = load(root / row["image_path"]).array
    lung = load(root / row["lung_path"], np.uint8).array > 0
    assert abs(float(np.median(image[:, 0, 0])) + 1000.0) < 60.0            # air in the corner
    assert -900.0 < float(np.median(image[lung])) < -780.0                    # parenchyma
    assert np.count_nonzero(image > 350) > 50                                  # ribs and spine
    z_lung = np.flatnonzero(lung.any(axis=(1, 2)))
    assert 0 < z_lung[0] and z_lung[-1] < image.shape[0] - 1                   # margins above and below
    areas = lung.sum(axis=(1, 2))[z_lung]
    assert areas[-1] < 0.5 * areas.max()                                       # small apex


def test_lesions_are_inside_the_lung_and_replace_parenchyma(tiny_cohort):
    root = tiny_cohort.parent
    for row in read_manifest(tiny_cohort)[:2]:
        image = load(root / row["image_path"]).array
        lesion = load(root / row["mask_path"], np.uint8).array > 0
        lung = load(root / row["lung_path"], np.uint8).array > 0
        assert lesion.any() and not np.any(lesion & ~lung)
        assert float(np.median(image[lesion])) > float(np.median(image[lung & ~lesion])) + 100.0


def test_same_seed_gives_byte_identical_files(tmp_path, tiny_cohort):
    from deepsc.data.synth import synthesize_cohort

    again = synthesize_cohort(tmp_path / "again", tiny_params()).parent
    first = tiny_cohort.parent
    names = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


def test_other_seed_gives_other_images(tmp_path, tiny_cohort):
    from deepsc.data.synth import synthesize_cohort

    other = synthesize_cohort(tmp_path / "other", tiny_params(seed=4)).parent
    name = "images/synth_0000.nii.gz"
    assert (other / name).read_bytes() != (tiny_cohort.parent / name).read_bytes()


def test_case_rng_does_not_depend_on_cohort_size():
    from deepsc.data.synth import SynthConfig, synthesize_case

    small = SynthConfig.from_params({**TINY, "n_normal": 1})
    large = SynthConfig.from_params({**TINY, "n_normal": 3})
    a = synthesize_case(small, 2, "normal", None).image.array
    b = synthesize_case(large, 2, "normal", None).image.array
    assert np.array_equal(a, b)


# --- writing safely -----------------------------------------------------------------------

def test_up_to_date_cohort_is_left_alone(tmp_path, caplog):
    from deepsc.data.synth import synthesize_cohort

    manifest = synthesize_cohort(tmp_path / "data", tiny_params(n_cap=0, n_covid=0))
    before = manifest.stat().st_mtime_ns
    with caplog.at_level("INFO"):
        assert synthesize_cohort(tmp_path / "data", tiny_params(n_cap=0, n_covid=0)) == manifest
    assert manifest.stat().st_mtime_ns == before
    assert "nothing to do" in caplog.text
    synthesize_cohort(tmp_path / "data", tiny_params(n_cap=0, n_covid=0, n_normal=2))   # new settings
    assert len(read_manifest(manifest)) == 2


def test_cohort_from_other_generator_code_is_regenerated(tmp_path, monkeypatch):
    from deepsc.data import synth

    manifest = synth.synthesize_cohort(tmp_path / "data", tiny_params(n_cap=0, n_covid=0))
    before = json.loads((tmp_path / "data" / "synth.json").read_text())
    monkeypatch.setattr(synth, "generator_digest", lambda: "0" * 64)
    synth.synthesize_cohort(tmp_path / "data", tiny_params(n_cap=0, n_covid=0))
    after = json.loads((tmp_path / "data" / "synth.json").read_text())
    assert after["generator_sha256"] == "0" * 64 != before["generator_sha256"]
    assert after["content_sha256"] == before["content_sha256"] and manifest.is_file()


def test_tampered_cohort_is_regenerated(tmp_path):
    from deepsc.data.synth import synthesize_cohort

    manifest = synthesize_cohort(tmp_path / "data", tiny_params(n_cap=0, n_covid=0))
    image = tmp_path / "data" / "images" / "synth_0000.nii.gz"
    original = image.read_bytes()
    image.write_bytes(b"broken")
    synthesize_cohort(tmp_path / "data", tiny_params(n_cap=0, n_covid=0))
    assert image.read_bytes() == original and manifest.is_file()


def test_refuses_to_overwrite_a_folder_that_is_not_a_synth_cohort(tmp_path):
    from deepsc.data.synth import synthesize_cohort

    real = tmp_path / "data"
    real.mkdir()
    (real / "patient_001.nii.gz").write_bytes(b"real scan")
    with pytest.raises(InputError, match="--force"):
        synthesize_cohort(real, tiny_params(n_cap=0, n_covid=0))
    assert (real / "patient_001.nii.gz").read_bytes() == b"real scan"
    synthesize_cohort(real, tiny_params(n_cap=0, n_covid=0), force=True)
    assert not (real / "patient_001.nii.gz").exists() and (real / "synth.json").is_file()


def test_interrupted_run_leaves_the_old_cohort_and_no_debris(tmp_path, monkeypatch):
    from deepsc.data import synth

    manifest = synth.synthesize_cohort(tmp_path / "data", tiny_params(n_cap=0, n_covid=0))
    old = manifest.read_bytes()
    calls = {"n": 0}
    real_case = synth.synthesize_case

    def fail_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_case(*args, **kwargs)

    monkeypatch.setattr(synth, "synthesize_case", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        synth.synthesize_cohort(tmp_path / "data", tiny_params(n_cap=0, n_covid=0, n_normal=2))
    assert manifest.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_cli_writes_to_the_data_path(tmp_path, capsys):
    from deepsc.data.synth_cli import add_cli, run_cli  # what `deepsc synth` runs

    parser = argparse.ArgumentParser()
    add_cli(parser)
    params = {"paths": {"data": str(tmp_path / "cohort")}, **tiny_params(n_cap=0, n_covid=0)}
    assert run_cli(parser.parse_args([]), params) == 0
    assert (tmp_path / "cohort" / "manifest.csv").is_file()
    assert "manifest.csv" in capsys.readouterr().out
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (tmp_path / "cohort", tmp_path / "cohort" / "manifest.csv"):  # others may read the cohort
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path


# --- lesion generator ---------------------------------------------------------------------

def test_burdens_are_stratified_samples_of_the_profile():
    from deepsc.data.synth_lesions import CAP, COVID, sample_burdens

    for profile in (COVID, CAP):
        burdens = sample_burdens(np.random.default_rng(0), profile, 40)
        expected_count = float(np.dot(np.arange(1, len(profile.count_pmf) + 1), profile.count_pmf))
        assert np.mean([b.count for b in burdens]) == pytest.approx(expected_count, rel=0.1)
        assert np.mean([b.lvr for b in burdens]) == pytest.approx(profile.lvr_mean, rel=0.15)
    assert sample_burdens(np.random.default_rng(0), COVID, 0) == []


def test_profile_rejects_bad_probabilities():
    from dataclasses import replace

    from deepsc.data.synth_lesions import COVID

    with pytest.raises(ValueError, match="count_pmf"):
        replace(COVID, count_pmf=(0.5, 0.2))
    with pytest.raises(ValueError, match="consolidation_prob"):
        replace(COVID, consolidation_prob=1.5)


def test_painted_lesions_are_separate_components():
    from deepsc.data.analysis import lesion_components
    from deepsc.data.synth_anatomy import ScanGeometry, build_anatomy, sample_anatomy, slices_needed
    from deepsc.data.synth_lesions import COVID, LesionBurden, paint_lesions

    rng = np.random.default_rng(5)
    params = sample_anatomy(rng, 64 * 5.0)
    geometry = ScanGeometry((slices_needed(params, 6.0), 64, 64), (6.0, 5.0, 5.0))
    anatomy = build_anatomy(rng, geometry, params)
    hu = anatomy.hu.copy()
    mask, painted = paint_lesions(rng, geometry, anatomy, hu, LesionBurden(count=6, lvr=0.12), COVID)
    _, count = lesion_components(mask, min_voxels=1)
    assert len(painted) == 6 and count == 6
    assert not np.any(mask.astype(bool) & ~anatomy.lung)
    assert np.array_equal(hu[~mask.astype(bool)], anatomy.hu[~mask.astype(bool)])


def test_synth_command_keeps_an_imported_cohort(tmp_path, capsys):
    """`make run` calls `deepsc synth` first: a cohort imported into the synth folder (other files,
    a manifest of another source) must survive it; --force still replaces it."""
    from deepsc.cli import main
    from deepsc.config import dump_resolved
    from deepsc.data.synth import synthesize_cohort

    data = tmp_path / "data"
    synthesize_cohort(data, tiny_params(n_cap=0, n_covid=0))
    (data / "own").mkdir()
    (data / "own" / "patient_001.nii.gz").write_bytes(b"real scan")
    params_file = tmp_path / "params.yaml"
    dump_resolved(tiny_params(n_cap=0, n_covid=0), params_file)
    command = ["--params", str(params_file), "synth", "--out", str(data)]
    assert main(command) == 2
    assert "did not write (own/patient_001.nii.gz)" in capsys.readouterr().err
    assert (data / "own" / "patient_001.nii.gz").read_bytes() == b"real scan"

    (data / "own" / "patient_001.nii.gz").unlink()
    (data / "manifest.csv").write_text("case_id,label,image_path,mask_path,lung_path,source\n"
                                       "p1,covid,/scans/p1.nii.gz,,,MosMedData CT-2\n")
    assert main(command) == 2 and "manifest.csv (rows of another source)" in capsys.readouterr().err
    assert "MosMedData" in (data / "manifest.csv").read_text()
    assert main([*command, "--force"]) == 0
    assert "deepsc-synth" in (data / "manifest.csv").read_text()
