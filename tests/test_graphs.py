"""The inference graphs (app/graphs.py) compute what the Keras models compute, from the files."""

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow as tf

from app import graphs
from app.cli import main
from app.precision import build_networks
from app.predictor import Predictor
from app.weights import DEFAULT_WEIGHTS_DIR, LOCALIZATION_WEIGHTS, SEGMENTATION_WEIGHTS

ROOT = DEFAULT_WEIGHTS_DIR.parent
FILES = {"localization": DEFAULT_WEIGHTS_DIR / LOCALIZATION_WEIGHTS,
         "segmentation": DEFAULT_WEIGHTS_DIR / SEGMENTATION_WEIGHTS}


@pytest.fixture(scope="module")
def volume():
    """Real CT in network units on a 2 mm grid of 64 x 64 x 96 (z, y, x) around the organs of
    ts_example, so that the networks predict organs and the comparison covers them."""
    from app.geometry import to_canonical
    from app.preprocessing import scale_intensity
    from tests.conftest import shared_data_or_skip

    data = shared_data_or_skip()
    image, _ = to_canonical(sitk.ReadImage(str(data / "images" / "ts_example_0000.nii.gz"),
                                           sitk.sitkFloat32))
    labels = sitk.Resample(sitk.ReadImage(str(data / "labels" / "ts_example.nii.gz")), image,
                           sitk.Transform(), sitk.sitkNearestNeighbor)
    organs = np.argwhere(sitk.GetArrayViewFromImage(labels) > 0)
    centre = image.TransformContinuousIndexToPhysicalPoint(
        [float(c) for c in organs.mean(axis=0)[::-1]])
    size_xyz, spacing = (96, 64, 64), 2.0
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(centre) - direction @ (np.asarray(size_xyz) - 1) * spacing / 2
    grid = sitk.Image(size_xyz, sitk.sitkFloat32)
    grid.SetSpacing((spacing,) * 3)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin(tuple(origin))
    crop = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0)
    return scale_intensity(sitk.GetArrayFromImage(crop))[None, ..., None]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_graphs_give_the_keras_models_outputs(precision, volume):
    localization_net, scn = build_networks(precision)
    localization_net.load_weights(FILES["localization"])
    scn.load_weights(FILES["segmentation"])
    dtype = {"float32": tf.float32, "bfloat16": tf.bfloat16}[precision]
    weights = {network: graphs.Weights(graphs.read_weights(path, network), dtype)
               for network, path in FILES.items()}
    keras_logits = localization_net(volume, training=False).numpy()
    logits = tf.function(graphs.localization_logits)(volume, weights["localization"]).numpy()
    keras_probabilities = scn(volume, training=False)["probabilities"].numpy()
    probabilities = tf.function(graphs.scn_probabilities)(volume, weights["segmentation"]).numpy()
    assert probabilities.dtype == logits.dtype == np.float32
    assert probabilities.shape == keras_probabilities.shape == (*volume.shape[:4], 5)
    assert keras_probabilities.argmax(-1).min() != keras_probabilities.argmax(-1).max()
    if precision == "float32":
        np.testing.assert_allclose(logits, keras_logits, atol=1e-4)
        np.testing.assert_allclose(probabilities, keras_probabilities, atol=1e-5)
    else:  # fused bfloat16 kernels in a graph round differently from Keras' eager layers
        np.testing.assert_allclose(probabilities, keras_probabilities, atol=0.02)
        assert np.mean(probabilities.argmax(-1) == keras_probabilities.argmax(-1)) > 0.999


def test_the_layout_file_matches_what_the_keras_models_write():
    result = subprocess.run([sys.executable, "-m", "release.layout"], cwd=ROOT, capture_output=True,
                            encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "matches" in result.stdout


def test_weights_are_read_by_variable_name_with_their_values():
    localization_net, _ = build_networks("float32")
    localization_net.load_weights(FILES["localization"])
    values = graphs.read_weights(FILES["localization"], "localization")
    assert set(values) == {v.path for v in localization_net.weights}
    for variable in localization_net.weights:
        np.testing.assert_array_equal(values[variable.path], variable.numpy())


def test_a_file_of_the_other_network_or_no_weights_file_is_refused(tmp_path):
    with pytest.raises(graphs.WeightsError, match="not the segmentation network's weights"):
        graphs.read_weights(FILES["localization"], "segmentation")
    text = tmp_path / "text.weights.h5"
    text.write_text("not hdf5")
    with pytest.raises(graphs.WeightsError, match=f"{text}: not a readable weights file"):
        graphs.read_weights(text, "localization")
    reshaped = tmp_path / "reshaped.weights.h5"
    shutil.copy(FILES["localization"], reshaped)
    with h5py.File(reshaped, "r+") as h5:
        place = next(p for p, (v, _) in graphs.layout_of_file("localization").items()
                     if v == "localization_prediction/bias")
        del h5[place]
        h5[place] = np.zeros(3, np.float32)
    with pytest.raises(graphs.WeightsError, match="localization_prediction/bias has shape"):
        graphs.read_weights(reshaped, "localization")


def test_bad_weights_stop_the_command_before_any_case(tmp_path, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(FILES["localization"], weights / LOCALIZATION_WEIGHTS)
    shutil.copy(FILES["localization"], weights / SEGMENTATION_WEIGHTS)  # the wrong network
    with pytest.raises(ValueError, match=SEGMENTATION_WEIGHTS):
        Predictor(weights)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "case_0000.nii.gz").write_bytes(b"")
    assert main([str(inputs), str(tmp_path / "out"), "--weights", str(weights), "--quiet"]) == 2
    assert "not the segmentation network's weights" in capsys.readouterr().err


def test_loading_without_warm_up_gives_the_same_labels(predictor):
    from synthetic import generate_case

    image, _ = generate_case(3, in_plane_size=64)
    eager = Predictor(warm_up=False)  # loads in the constructor, runs nothing before predict
    assert eager._ready["segmentation"].is_set()
    labels = sitk.GetArrayFromImage(eager.predict(image).labels)
    reference = sitk.GetArrayFromImage(predictor.predict(image).labels)
    assert labels.any()
    np.testing.assert_array_equal(labels, reference)
