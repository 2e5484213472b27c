"""Importing the published EfficientSCN weights: names, shapes, values in the right layers, the
preprocessing they need, and the published localization network finding the organs on real CT.

The published models are read from ../shared/upstream (never copied into the project). Its
segmentation model has no values here, so the segmentation mapping is tested with a checkpoint that
has exactly the published names and shapes (from its variables.index) and random values, against a
direct computation of the network from the checkpoint's arrays.
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow as tf

from app import method
from app.geometry import Grid, area_resample
from app.localization import localization_grid
from app.networks import build_localization_net, build_scn
from app.predictor import Predictor
from app.preprocessing import network_input
from app.weights import DEFAULT_WEIGHTS_DIR, PROVENANCE, PreprocessingSettings, read_settings
from release.import_weights import VALUE_SUFFIX, import_weights
from release.import_weights import main as import_main
from release.roi_coverage import roi_coverage
from synthetic import generate_case
from tests.conftest import ROOT, shared_or_skip

UPSTREAM = ROOT.parent / "shared" / "upstream" / "efficientscn"
SPATIAL_NETS = ("liver", "kidney", "spleen", "pancreas", "background")  # published creation order


def published_or_skip():
    """../shared/upstream/efficientscn: skipped where absent, failed under REQUIRE_SHARED_DATA."""
    shared_or_skip(UPSTREAM / "localization" / "variables" / "variables.index",
                   "the published weights are obtained by users, not shipped")
    return UPSTREAM


@pytest.fixture(scope="module")
def published():
    return published_or_skip()


@pytest.fixture(scope="module")
def imported_localization(published, tmp_path_factory):
    """A weights folder: the published localization network, our segmentation network."""
    out = tmp_path_factory.mktemp("imported") / "published_weights"
    import_weights(published, out, only="localization")
    return out


@pytest.fixture(scope="module")
def published_predictor(imported_localization):
    return Predictor(imported_localization)


def published_shapes(network):
    """{checkpoint key: (shape, dtype)} as listed by the published variables.index."""
    reader = tf.train.load_checkpoint(str(UPSTREAM / network / "variables" / "variables"))
    dtypes = reader.get_variable_to_dtype_map()
    return {key: (tuple(shape), dtypes[key])
            for key, shape in reader.get_variable_to_shape_map().items()}


def write_checkpoint(saved_model, arrays):
    """A SavedModel-like folder whose variables checkpoint holds exactly ``arrays`` (key: value)."""
    prefix = saved_model / "variables" / "variables"
    prefix.parent.mkdir(parents=True)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=list(arrays),
                      shape_and_slices=[""] * len(arrays),
                      tensors=[tf.constant(value) for value in arrays.values()])


def random_values(shapes, seed):
    """He-scaled random kernels, small random biases, an empty object graph: {key: array}."""
    rng = np.random.default_rng(seed)
    values = {}
    for key, (shape, dtype) in shapes.items():
        if dtype == tf.string:
            values[key] = np.array(b"")
        elif len(shape) == 5:
            std = np.sqrt(2.0 / np.prod(shape[:-1]))
            values[key] = rng.normal(0, std, shape).astype(np.float32)
        else:
            values[key] = rng.normal(0, 0.1, shape).astype(np.float32)
    return values


# --- a direct computation of the published networks from their checkpoint arrays -------------

def conv(x, kernel, bias, leaky=True):
    y = tf.nn.conv3d(x, kernel, strides=[1] * 5, padding="SAME") + bias
    return tf.nn.leaky_relu(y, method.LEAKY_RELU_ALPHA) if leaky else y


def resize_axis(x, axis, factor, kind):
    """Upsample one spatial axis of (b, z, y, x, c) with tf.image.resize (half-pixel centres).

    Cubic: edge-padded by 2 input voxels, 8 output voxels cropped per end (METHOD.md).
    """
    pad = 2 if kind == "bicubic" else 0
    if pad:
        x = tf.concat([tf.gather(x, [0] * pad, axis=axis), x,
                       tf.gather(x, [x.shape[axis] - 1] * pad, axis=axis)], axis=axis)
    moved = np.moveaxis(x.numpy(), axis, 1)
    b, n, p, q, c = moved.shape
    resized = tf.image.resize(moved.reshape(b, n, p * q, c), (factor * n, p * q), method=kind)
    resized = resized.numpy()[:, pad * factor: factor * n - pad * factor]
    return tf.constant(np.moveaxis(resized.reshape(b, -1, p, q, c), 1, axis))


def upsample(x, factor, kind):
    for axis in (1, 2, 3):
        x = resize_axis(x, axis, factor, kind)
    return x


def reference_unet(x, arrays, levels):
    """U-Net from arrays in creation order (contracting 0..L-1, expanding 0..L-1; k, b, k, b)."""
    blocks = [arrays[4 * i: 4 * i + 4] for i in range(2 * levels)]

    def block(t, weights):
        return conv(conv(t, weights[0], weights[1]), weights[2], weights[3])

    skips = []
    for level in range(levels):
        x = block(x, blocks[level])
        if level < levels - 1:
            skips.append(x)
            x = tf.nn.avg_pool3d(x, 2, 2, "VALID")
    x = block(x, blocks[2 * levels - 1])
    for level in reversed(range(levels - 1)):
        x = block(tf.concat([skips[level], upsample(x, 2, "bilinear")], -1), blocks[levels + level])
    return x


def reference_localization(x, values):
    arrays = [values[f"model/variables/{i}{VALUE_SUFFIX}"] for i in range(42)]
    return conv(reference_unet(x, arrays[:40], 5), arrays[40], arrays[41], leaky=False).numpy()


def reference_scn(x, values):
    """local logits, spatial logits, probabilities of the SCN, computed from the checkpoint."""
    local_arrays = [values[f"local_appearance/variables/{i}{VALUE_SUFFIX}"] for i in range(40)]
    local_logits = conv(reference_unet(x, local_arrays, 5),
                        values[f"local_appearance/prediction/kernel{VALUE_SUFFIX}"],
                        values[f"local_appearance/prediction/bias{VALUE_SUFFIX}"], leaky=False)
    local = tf.sigmoid(local_logits)
    image_low = tf.nn.avg_pool3d(x, 4, 4, "VALID")
    organs_low = tf.nn.avg_pool3d(local[..., 1:], 4, 4, "VALID")
    outputs = {}
    for index, name in enumerate(SPATIAL_NETS):
        arrays = [values[f"spatial_configuration/variables/{34 * index + i}{VALUE_SUFFIX}"]
                  for i in range(34)]
        others = [organs_low[..., j:j + 1] for j in range(4) if j != index]
        net_input = tf.concat([image_low, *(others if name != "background" else [organs_low])], -1)
        outputs[name] = conv(reference_unet(net_input, arrays[:32], 4), arrays[32], arrays[33],
                             leaky=False)
    spatial_low = tf.concat([outputs[n] for n in ("background", *SPATIAL_NETS[:4])], -1)
    spatial_logits = upsample(spatial_low, 4, "bicubic")
    s = tf.clip_by_value(tf.sigmoid(spatial_logits), 1e-7, 1 - 1e-7)
    u = -(s * tf.math.log(s) + (1 - s) * tf.math.log(1 - s)) / np.log(2.0)
    combined = local * u + s * (1 - u)
    probabilities = combined / tf.reduce_sum(combined, -1, keepdims=True)
    return local_logits.numpy(), spatial_logits.numpy(), probabilities.numpy()


def assert_close(ours, reference):
    scale = float(np.abs(reference).max())
    assert scale > 1e-3  # the comparison means something only if the values are not all ~0
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * scale)


# --- the published localization network --------------------------------------------------

def test_imported_localization_is_the_documented_network_on_the_published_values(
        imported_localization):
    reader = tf.train.load_checkpoint(str(UPSTREAM / "localization" / "variables" / "variables"))
    values = {f"model/variables/{i}{VALUE_SUFFIX}": reader.get_tensor(
        f"model/variables/{i}{VALUE_SUFFIX}") for i in range(42)}
    net = build_localization_net()
    net.load_weights(imported_localization / "localization.weights.h5")
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (1, 32, 48, 32, 1)).astype(np.float32)
    assert_close(net(x, training=False).numpy(), reference_localization(x, values))


def test_import_records_source_license_counts_and_the_published_preprocessing(
        imported_localization):
    provenance = json.loads((imported_localization / PROVENANCE).read_text())
    assert provenance["license"] == "GPL-3.0 (published EfficientSCN models)"
    assert provenance["source"] == str(UPSTREAM.resolve())
    assert provenance["imported_networks"] == ["localization"]
    assert provenance["localization"]["parameters"] == 637_474
    assert provenance["localization"]["variables"] == 42
    assert (imported_localization / "LICENSE-GPL-3.0.txt").is_file()
    # the segmentation network was not imported: ours, said so, with our preprocessing
    assert provenance["mixed_origins"] is True
    assert provenance["segmentation"]["license"] == json.loads(
        (DEFAULT_WEIGHTS_DIR / PROVENANCE).read_text())["license"]
    assert read_settings(imported_localization) == PreprocessingSettings(
        localization_downsampling="area", localization_sigma_mm=0.0,
        segmentation_sigma_mm=1.0, crop_padding_hu=-1024.0)


def test_our_own_weights_keep_our_preprocessing():
    assert read_settings(DEFAULT_WEIGHTS_DIR) == PreprocessingSettings()
    assert PreprocessingSettings() == PreprocessingSettings(
        localization_sigma_mm=3.0, segmentation_sigma_mm=1.0, crop_padding_hu=-1024.0,
        localization_downsampling="gaussian")


def test_published_localization_roi_contains_the_organs_of_real_ct(published_predictor,
                                                                      shared_data):
    predictor = published_predictor
    image = sitk.ReadImage(str(shared_data / "images" / "ts_example_0000.nii.gz"))
    labels = sitk.ReadImage(str(shared_data / "labels" / "ts_example.nii.gz"))
    record = roi_coverage(predictor, image, labels)
    assert record["coverage"] >= 0.99, record
    # a box around the organs, not the whole image (the whole image is the no-foreground answer)
    assert np.prod(record["roi_size_xyz"]) < 0.6 * np.prod(record["size_xyz"]), record
    # and the network saw the input it was trained on: area downsampling, no smoothing
    grid = localization_grid(Grid.of(image))
    np.testing.assert_array_equal(predictor.localization_input(image, grid),
                                  network_input(image, grid, 0.0, method.PADDING_HU, "area"))


def test_published_localization_roi_contains_the_organs_of_a_generated_case(
        published_predictor):
    record = roi_coverage(published_predictor, *generate_case(4, in_plane_size=128))
    assert record["coverage"] >= 0.99, record
    assert np.prod(record["roi_size_xyz"]) < 0.6 * np.prod(record["size_xyz"]), record


# --- the segmentation mapping, on a checkpoint with the published names ---------------------

@pytest.fixture(scope="module")
def random_segmentation(published, tmp_path_factory):
    """(imported weights folder, checkpoint values) for a random SCN with the published names."""
    base = tmp_path_factory.mktemp("random_scn")
    values = random_values(published_shapes("segmentation"), seed=7)
    write_checkpoint(base / "models" / "segmentation", values)
    import_weights(base / "models", base / "weights", only="segmentation")
    return base / "weights", values


@pytest.fixture(scope="module")
def scn_input():
    return np.random.default_rng(1).uniform(-0.5, 0.5, (1, 32, 32, 64, 1)).astype(np.float32)


def test_every_published_segmentation_value_lands_in_its_layer(random_segmentation, scn_input):
    weights, values = random_segmentation
    scn = build_scn()
    scn.load_weights(weights / "segmentation.weights.h5")
    ours = scn(scn_input, training=False)
    local_logits, spatial_logits, probabilities = reference_scn(scn_input, values)
    assert_close(ours["local_logits"].numpy(), local_logits)
    assert_close(ours["spatial_logits"].numpy(), spatial_logits)
    assert_close(ours["probabilities"].numpy(), probabilities)


def test_the_reference_comparison_detects_two_swapped_spatial_nets(random_segmentation, scn_input):
    weights, values = random_segmentation
    scn = build_scn()
    scn.load_weights(weights / "segmentation.weights.h5")
    by_path = {variable.path: variable for variable in scn.weights}
    for suffix in ("contracting_0/conv_0/kernel", "prediction/bias"):
        kidney, spleen = by_path[f"spatial_kidney_{suffix}"], by_path[f"spatial_spleen_{suffix}"]
        kidney_value = kidney.numpy()
        kidney.assign(spleen.numpy())
        spleen.assign(kidney_value)
    _, spatial_logits, _ = reference_scn(scn_input, values)
    with pytest.raises(AssertionError):
        assert_close(scn(scn_input, training=False)["spatial_logits"].numpy(), spatial_logits)


def test_imported_segmentation_gets_the_published_crop_padding(random_segmentation):
    weights, _ = random_segmentation
    settings = read_settings(weights)
    assert (settings.crop_padding_hu, settings.segmentation_sigma_mm) == (0.0, 1.0)
    assert settings.localization_downsampling == "gaussian"  # our localization, our settings
    provenance = json.loads((weights / PROVENANCE).read_text())
    assert provenance["segmentation"]["parameters"] == 1_270_090
    assert provenance["segmentation"]["variables"] == 212


# --- refusals ------------------------------------------------------------------------------

def localization_values():
    return random_values(published_shapes("localization"), seed=3)


def test_a_wrong_shape_is_refused_naming_the_variable_and_both_shapes(published, tmp_path):
    values = localization_values()
    values[f"model/variables/20{VALUE_SUFFIX}"] = np.zeros((3, 3, 3, 32, 32), np.float32)
    write_checkpoint(tmp_path / "models" / "localization", values)
    with pytest.raises(ValueError, match=r"model/variables/20 .*expected shape \(3, 3, 3, 64, 32\)"
                                         r", found \(3, 3, 3, 32, 32\)"):
        import_weights(tmp_path / "models", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # nothing written


def test_missing_and_unexpected_variables_are_refused_by_name(published, tmp_path):
    values = localization_values()
    del values[f"model/variables/41{VALUE_SUFFIX}"]
    values[f"model/variables/42{VALUE_SUFFIX}"] = np.zeros(2, np.float32)
    write_checkpoint(tmp_path / "models" / "localization", values)
    with pytest.raises(ValueError, match=r"missing variables \['model/variables/41'\], "
                                         r"unexpected variables \['model/variables/42'\]"):
        import_weights(tmp_path / "models", tmp_path / "out")


def test_a_model_without_its_values_file_is_refused_with_a_way_out(published, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"segmentation/variables: the values file .* "
                                                r"missing.*--only localization"):
        import_weights(published, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_imports_or_says_why_not(published, tmp_path, capsys):
    assert import_main([str(published), "--out", str(tmp_path / "both")]) == 2
    assert "--only localization" in capsys.readouterr().err
    assert import_main([str(published), "--out", str(tmp_path / "one"), "--only",
                        "localization"]) == 0
    printed = capsys.readouterr()
    assert "localization: published EfficientSCN SavedModel; license: GPL-3.0" in printed.out
    assert "different sources" in printed.err
    assert (tmp_path / "one" / "localization.weights.h5").is_file()


def test_an_existing_folder_is_replaced_only_when_asked(published, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_weights(published, out, only="localization")
    import_weights(published, out, only="localization", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "LICENSE-GPL-3.0.txt", "localization.weights.h5", "segmentation.weights.h5", PROVENANCE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left
    with pytest.raises(ValueError, match="project's own weights"):
        import_weights(published, DEFAULT_WEIGHTS_DIR, only="localization", overwrite=True)


def test_unknown_preprocessing_in_weights_json_is_an_error(tmp_path):
    (tmp_path / PROVENANCE).write_text(json.dumps({"preprocessing": {"resampling": "lanczos"}}))
    with pytest.raises(ValueError, match=r"weights.json: unknown preprocessing settings"):
        read_settings(tmp_path)
    (tmp_path / PROVENANCE).write_text(
        json.dumps({"preprocessing": {"localization_downsampling": "nearest"}}))
    with pytest.raises(ValueError, match="'nearest' is not one of gaussian, area"):
        read_settings(tmp_path)


# --- area downsampling -----------------------------------------------------------------------

def image_from(array_zyx, spacing, origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def test_area_downsampling_by_two_is_the_mean_of_each_block():
    voxels = np.random.default_rng(0).normal(size=(8, 10, 12)).astype(np.float32)
    image = image_from(voxels, (3.0, 3.0, 3.0))
    # 6 mm voxels centred between image voxels 0 and 1: each covers a 2 x 2 x 2 block exactly
    grid = Grid((6, 5, 4), (6.0, 6.0, 6.0), (1.5, 1.5, 1.5), image.GetDirection())
    blocks = voxels.reshape(4, 2, 5, 2, 6, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(sitk.GetArrayFromImage(area_resample(image, grid)), blocks,
                               atol=1e-5)


def test_area_downsampling_weighs_input_voxels_by_overlap():
    # a step at x = 9.5 mm (between voxels 9 and 10 of 1 mm); boxes 4 mm wide centred at 1.3 + 4k
    voxels = np.zeros((3, 3, 24), np.float32)
    voxels[..., 10:] = 100.0
    image = image_from(voxels, (1.0, 1.0, 1.0))
    grid = Grid((5, 1, 1), (4.0, 1.0, 1.0), (1.3, 1.0, 1.0), image.GetDirection())
    centres = 1.3 + 4.0 * np.arange(5)
    expected = 100.0 * np.clip(centres + 2.0 - 9.5, 0.0, 4.0) / 4.0
    np.testing.assert_allclose(sitk.GetArrayFromImage(area_resample(image, grid))[0, 0], expected,
                               atol=1e-4)


def test_area_downsampling_pads_outside_and_keeps_constants():
    image = image_from(np.full((10, 10, 10), 40, np.int16), (2.5, 2.5, 2.5))
    grid = Grid((8, 8, 8), (6.0, 6.0, 6.0), (-12.0, -12.0, -12.0), image.GetDirection())
    values = sitk.GetArrayFromImage(area_resample(image, grid, default_value=-1024.0))
    centres = -12.0 + 6.0 * np.arange(8)
    inside = (centres >= -1.25) & (centres < 23.75)
    mask = inside[:, None, None] & inside[None, :, None] & inside[None, None, :]
    np.testing.assert_allclose(values[mask], 40.0, atol=1e-4)
    assert np.all(values[~mask] == -1024.0)


def test_area_and_gaussian_localization_inputs_differ_on_real_ct(shared_data):
    image = sitk.ReadImage(str(shared_data / "images" / "ts_example_0000.nii.gz"))
    grid = localization_grid(Grid.of(image))
    area = network_input(image, grid, 0.0, method.PADDING_HU, "area")
    gaussian = network_input(image, grid, 3.0, method.PADDING_HU)
    assert area.shape == gaussian.shape == tuple(reversed(grid.size))
    # the same anatomy (close on average), not the same numbers (the published input is sharper)
    assert np.abs(area - gaussian).mean() < 0.02 < np.abs(area - gaussian).max()
    assert area.std() > gaussian.std()


# --- predict.sh with a weights folder --------------------------------------------------------

def test_an_explicit_weights_option_wins_over_weights_dir(imported_localization, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(ROOT / "tests" / "__init__.py", inputs / "case_0000.nii.gz")  # never read
    empty = tmp_path / "no_weights"
    empty.mkdir()
    completed = subprocess.run(
        [str(ROOT / "predict.sh"), str(inputs), str(tmp_path / "out"), "--weights", str(empty)],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
        env={**os.environ, "WEIGHTS_DIR": str(imported_localization)})
    assert completed.returncode == 2, completed.stderr
    assert f"{empty / 'localization.weights.h5'}: weights file missing" in completed.stderr


def test_predict_sh_runs_the_weights_of_weights_dir_and_names_their_origins(imported_localization,
                                                                             tmp_path):
    from synthetic import write_case

    write_case(tmp_path / "inputs", "case", 5, in_plane_size=128, max_voxels=128 * 128 * 60)
    (tmp_path / "inputs" / "case.nii.gz").unlink()  # the labels
    completed = subprocess.run([str(ROOT / "predict.sh"), str(tmp_path / "inputs"),
                                str(tmp_path / "out"), "--quiet"], capture_output=True,
                               text=True, encoding="utf-8", errors="replace", timeout=300,
                               env={**os.environ, "WEIGHTS_DIR": str(imported_localization)})
    assert completed.returncode == 0, completed.stderr
    assert ("localization = published EfficientSCN SavedModel, segmentation = copied from "
            f"{DEFAULT_WEIGHTS_DIR}") in completed.stderr
    image = sitk.ReadImage(str(tmp_path / "inputs" / "case_0000.nii.gz"))
    output = sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz"))
    assert (output.GetSize(), output.GetOrigin()) == (image.GetSize(), image.GetOrigin())
