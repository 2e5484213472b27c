"""Averaging one network's weights over weights folders (training.average_weights)."""

import filecmp
import json

import numpy as np
import pytest

from app.networks import build_scn
from app.weights import DEFAULT_WEIGHTS_DIR, LOCALIZATION_WEIGHTS, PROVENANCE, SEGMENTATION_WEIGHTS
from training.average_weights import main as average_main


def scn_values(path):
    model = build_scn()
    model.load_weights(path)
    return model.get_weights()


def test_the_average_is_the_elementwise_mean_and_the_rest_comes_from_the_first_folder(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    build_scn().save_weights(other / SEGMENTATION_WEIGHTS)  # a freshly initialised SCN
    out = tmp_path / "average"

    average_main([str(DEFAULT_WEIGHTS_DIR), str(other), "--out", str(out)])

    shipped = scn_values(DEFAULT_WEIGHTS_DIR / SEGMENTATION_WEIGHTS)
    fresh = scn_values(other / SEGMENTATION_WEIGHTS)
    averaged = scn_values(out / SEGMENTATION_WEIGHTS)
    assert len(averaged) == len(shipped)
    assert any(not np.allclose(a, b) for a, b in zip(shipped, fresh))
    for a, b, mean in zip(shipped, fresh, averaged):
        np.testing.assert_allclose(mean, (a.astype(np.float64) + b) / 2, rtol=0, atol=1e-7)
    assert filecmp.cmp(out / LOCALIZATION_WEIGHTS, DEFAULT_WEIGHTS_DIR / LOCALIZATION_WEIGHTS,
                       shallow=False)
    provenance = json.loads((out / PROVENANCE).read_text())
    assert provenance["segmentation"]["averaged_from"] == [str(DEFAULT_WEIGHTS_DIR), str(other)]
    assert "scores" not in provenance
    assert provenance["localization"] == json.loads(
        (DEFAULT_WEIGHTS_DIR / PROVENANCE).read_text())["localization"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["average", "other"]  # no partial left


def test_refuses_a_single_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        average_main([str(DEFAULT_WEIGHTS_DIR), "--out", str(tmp_path / "new")])
    assert "at least two weights folders" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_refuses_to_overwrite_a_folder(tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    with pytest.raises(SystemExit):
        average_main([str(DEFAULT_WEIGHTS_DIR), str(DEFAULT_WEIGHTS_DIR),
                      "--out", str(tmp_path / "exists")])
    assert "exists; write the average to a new folder" in capsys.readouterr().err
    assert list((tmp_path / "exists").iterdir()) == []


def test_an_average_of_snapshots_records_each_snapshot_not_the_first_ones(tmp_path):
    folders = []
    for iteration in (500, 1000):
        folder = tmp_path / f"{iteration:06d}"
        folder.mkdir()
        for name in (SEGMENTATION_WEIGHTS, LOCALIZATION_WEIGHTS):
            (folder / name).write_bytes((DEFAULT_WEIGHTS_DIR / name).read_bytes())
        provenance = json.loads((DEFAULT_WEIGHTS_DIR / PROVENANCE).read_text())
        provenance["segmentation"]["snapshot"] = {"run": "runs/x", "iteration": iteration}
        (folder / PROVENANCE).write_text(json.dumps(provenance))
        folders.append(str(folder))
    average_main(folders + ["--out", str(tmp_path / "average")])
    entry = json.loads((tmp_path / "average" / PROVENANCE).read_text())["segmentation"]
    assert "snapshot" not in entry
    assert entry["averaged_snapshots"] == [{"run": "runs/x", "iteration": 500},
                                           {"run": "runs/x", "iteration": 1000}]
    assert entry["averaged_from"] == folders
