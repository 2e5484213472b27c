"""Training pieces: augmentation keeps image and labels aligned; a tiny run trains and exports;
a short run learns what held-out cases show."""

import csv
import json
from dataclasses import replace

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from app import method
from training import augment
from training.cases import prepare_case

pytestmark = pytest.mark.slow  # training runs (make test-fast skips them)


def labelled_phantom(ramp_hu_per_slice=0):
    """An image whose HU encode its labels: HU = 100 * label - 500, on an oblique-free grid;
    ``ramp_hu_per_slice`` adds that many HU per slice (z), so that no two slices are alike."""
    labels = np.zeros((60, 70, 80), np.uint8)
    labels[15:45, 20:40, 10:35] = 1
    labels[20:40, 30:55, 45:70] = 3
    labels[25:35, 45:60, 30:50] = 4
    ramp = ramp_hu_per_slice * np.arange(labels.shape[0], dtype=np.int16)[:, None, None]
    image = sitk.GetImageFromArray(100 * labels.astype(np.int16) - 500 + ramp)
    image.SetSpacing((3.0, 3.0, 3.0))
    image.SetOrigin((-100.0, 50.0, 20.0))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    return prepare_case("phantom", image, label_image)


@pytest.fixture(scope="module")
def phantom():
    return labelled_phantom()


def test_every_augmentation_keeps_labels_on_their_structures(phantom):
    rng = np.random.default_rng(3)
    none = augment.AugmentationRanges.none()
    single = {
        "translation": replace(none, translation_mm=20.0),
        "rotation": replace(none, rotation_rad=0.35),
        "scale": replace(none, scale=0.2, axis_scale=0.1),
        "elastic": replace(none, elastic_mm=15.0),
        "all spatial": augment.AugmentationRanges(intensity_shift=0.0, intensity_scale=0.0),
    }
    for name, ranges in single.items():
        for _ in range(3):
            image, labels = augment.segmentation_sample(phantom, rng, (32, 64, 64), ranges)
            hu = image * method.INTENSITY_DIVISOR_HU
            for label in np.unique(labels[labels > 0]):  # background includes padding
                inside = ndimage.binary_erosion(labels == label, iterations=2)
                if inside.sum() < 20:
                    continue
                # away from borders the image still shows this label's own intensity
                assert np.median(hu[inside]) == pytest.approx(100 * int(label) - 500, abs=30), name
    image, labels = augment.segmentation_sample(phantom, rng, (32, 32, 32))
    assert image.shape == labels.shape == (32, 32, 32) and image.dtype == np.float32
    assert image.min() >= -1 and image.max() <= 1


def test_keep_slab_repeats_the_edge_rows_of_image_and_labels():
    image = np.arange(6 * 2 * 2, dtype=np.float32).reshape(6, 2, 2)
    labels = np.arange(6, dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(2, 2)
    augment.keep_slab(image, labels, 2, 4)
    assert [float(row[0, 0]) for row in image] == [8, 8, 8, 12, 12, 12]
    assert labels[:, 0, 0].tolist() == [2, 2, 2, 3, 3, 3]


def test_slab_samples_keep_only_a_slab_of_rows_and_coarsen_the_spacing(phantom):
    ramped = labelled_phantom(ramp_hu_per_slice=5)  # the slab's own rows all differ
    none = augment.AugmentationRanges.none()
    thin = replace(none, slab_probability=1.0, slab_thickness_mm=(20.0, 20.0),
                   slab_spacing_mm=(2.5, 2.5))
    rng = np.random.default_rng(11)
    for _ in range(6):
        image, labels = augment.segmentation_sample(ramped, rng, (32, 32, 32), thin,
                                                    organ_centred=1.0)
        # 20 mm at 2.5 mm: image and labels change between at most 8 pairs of neighbouring rows
        # (the rest repeat the slab's edge rows), and the organ-centred slab holds labels
        assert labels.any()
        for values in (image, labels):
            changes = np.flatnonzero(np.any(values[:-1] != values[1:], axis=(1, 2)))
            assert len(changes) <= 8
        assert np.any(image[:-1] != image[1:])
    # the same pancreas seen at 3 mm covers (2/3)^3 of the voxels it covers at 2 mm
    whole = replace(none, slab_probability=1.0, slab_thickness_mm=(1e4, 1e4),
                    slab_spacing_mm=(3.0, 3.0))
    counts = {}
    for name, ranges in {"2 mm": none, "3 mm": whole}.items():
        _, labels = augment.segmentation_sample(phantom, np.random.default_rng(0), (96, 96, 96),
                                                ranges, organ_centred=1.0)
        counts[name] = int((labels == 4).sum())
    assert counts["3 mm"] / counts["2 mm"] == pytest.approx((2 / 3) ** 3, rel=0.1)


def test_localization_sample_marks_organs_as_foreground(phantom):
    rng = np.random.default_rng(4)
    ranges = augment.AugmentationRanges(intensity_shift=0.0, intensity_scale=0.0)
    image, foreground = augment.localization_sample(phantom, rng, ranges)
    hu = image * method.INTENSITY_DIVISOR_HU
    inside = ndimage.binary_erosion(foreground > 0, iterations=1)
    assert inside.any() and np.all(hu[inside] > -450)


def test_the_sampled_transform_resamples_exactly_as_its_composite(phantom):
    """random_transform's displacement field maps the crop's points as the affine-after-B-spline
    composite does: the same image and labels, on an oblique grid with anisotropic spacing."""
    from app.geometry import Grid

    rotation = augment.rotation_matrix((0.3, -0.2, 0.5))
    grid = Grid((24, 20, 16), (2.0, 2.5, 3.1), (-60.0, 80.0, 40.0),
                tuple(float(v) for v in rotation.ravel()))
    ranges = augment.AugmentationRanges()
    centre = grid.axis_mm_to_physical(np.asarray(grid.size) * grid.spacing_mm / 2)
    composite = augment.random_composite(np.random.default_rng(3), grid, centre, ranges)
    field = augment.random_transform(np.random.default_rng(3), grid, centre, ranges)
    assert isinstance(field, sitk.DisplacementFieldTransform)
    for source, interpolator in ((phantom.segmentation_image, sitk.sitkLinear),
                                 (phantom.segmentation_labels, sitk.sitkNearestNeighbor)):
        by_composite, by_field = (sitk.GetArrayFromImage(sitk.Resample(
            source, grid.reference(), transform, interpolator, -1000.0, sitk.sitkFloat32))
            for transform in (composite, field))
        assert by_composite.std() > 0  # the crop holds structure
        np.testing.assert_array_equal(by_field, by_composite)
    # the field evaluated axis by axis is ITK's point-by-point evaluation of the composite
    reference = sitk.TransformToDisplacementField(
        composite, sitk.sitkVectorFloat64, grid.size, grid.origin_mm, grid.spacing_mm,
        grid.direction)
    np.testing.assert_allclose(sitk.GetArrayFromImage(field.GetDisplacementField()),
                               sitk.GetArrayFromImage(reference), rtol=0, atol=1e-9)
    # without an elastic part the composite itself, an affine, is cheap enough
    rigid = replace(ranges, elastic_mm=0.0)
    assert isinstance(augment.random_transform(np.random.default_rng(3), grid, centre, rigid),
                      sitk.CompositeTransform)


def test_the_elastic_control_grid_lies_along_the_crop_axes_or_is_refused():
    """The axis-by-axis evaluation needs a control grid along the crop's axes: grid_bspline's
    is, to double precision, on an oblique grid where sitk.BSplineTransformInitializer's (single
    precision) is not, and displacement_field refuses that one rather than approximating it."""
    from app.geometry import Grid

    rotation = augment.rotation_matrix((0.3, -0.2, 0.5))
    grid = Grid((12, 10, 8), (2.0, 2.5, 3.1), (-60.0, 80.0, 40.0),
                tuple(float(v) for v in rotation.ravel()))
    ours = augment.grid_bspline(grid, 5)
    np.testing.assert_array_equal(ours.GetFixedParameters()[9:], grid.direction)
    theirs = sitk.BSplineTransformInitializer(grid.reference(), [5] * 3, 3)
    # the same domain as the initializer's, to its single precision
    np.testing.assert_allclose(ours.GetFixedParameters(), theirs.GetFixedParameters(),
                               rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="axes"):
        augment.displacement_field(sitk.AffineTransform(3), theirs, grid)


def test_samples_are_deterministic_for_a_seed(phantom):
    ranges = augment.AugmentationRanges()
    a, la = augment.segmentation_sample(phantom, np.random.default_rng(5), (32, 32, 32), ranges)
    b, lb = augment.segmentation_sample(phantom, np.random.default_rng(5), (32, 32, 32), ranges)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)


def fixed_quality(slice_mm=2.0, blur_mm=0.0, noise_hu=0.0):
    """Ranges whose image-quality draws can only give these values."""
    return augment.AugmentationRanges(quality_probability=1.0, quality_slice_mm=(slice_mm,) * 2,
                                      quality_blur_mm=(blur_mm,) * 2,
                                      quality_noise_hu=(noise_hu,) * 2)


def rise_distance(profile, spacing_mm):
    """mm between the 10 % and 90 % points of a rising edge profile."""
    low, high = profile.min(), profile.max()
    positions = np.arange(len(profile)) * spacing_mm
    return (np.interp(low + 0.9 * (high - low), profile, positions)
            - np.interp(low + 0.1 * (high - low), profile, positions))


def test_scanner_quality_thickens_slices_softens_the_kernel_and_adds_noise():
    rng = np.random.default_rng(0)
    spacing = (2.0, 2.0, 2.0)
    flat = np.full((40, 40, 40), 40.0, np.float32)
    noisy = augment.scanner_quality(flat, spacing, rng, fixed_quality(noise_hu=12.0))
    assert noisy.mean() == pytest.approx(40.0, abs=0.2)
    assert noisy.std() == pytest.approx(12.0, rel=0.02)

    z_edge = np.zeros((40, 8, 8), np.float32)
    z_edge[20:] = 100.0
    same = augment.scanner_quality(z_edge, spacing, rng, fixed_quality(slice_mm=2.0))
    np.testing.assert_array_equal(same, z_edge)  # the grid's own 2 mm: nothing to widen
    thick = augment.scanner_quality(z_edge, spacing, rng, fixed_quality(slice_mm=6.0))
    # a Gaussian profile rises from 10 % to 90 % over 2.563 sigma; sigma = sqrt(6^2 - 2^2) / 2.355
    sigma_mm = np.sqrt(6.0 ** 2 - 2.0 ** 2) / augment.FWHM_PER_SIGMA
    assert rise_distance(thick[:, 4, 4], 2.0) == pytest.approx(2.563 * sigma_mm, rel=0.1)
    np.testing.assert_array_equal(thick[:, 0, :], thick[:, 7, :])  # in-plane untouched

    x_edge = np.zeros((8, 8, 40), np.float32)
    x_edge[..., 20:] = 100.0
    fine = (2.0, 0.5, 0.5)  # in-plane voxels well below the blur, so that they do not add width
    soft = augment.scanner_quality(x_edge, fine, rng, fixed_quality(blur_mm=1.5))
    assert rise_distance(soft[4, 4], 0.5) == pytest.approx(2.563 * 1.5, rel=0.1)
    np.testing.assert_array_equal(soft[0], soft[7])  # along z untouched at 2 mm slices


# Where seed 8's stream stands after one default sample of the phantom, as the code before the
# image-quality option left it: runs without the option resume onto the same samples only if
# the option, off, draws nothing.
STREAM_AFTER_SEGMENTATION_SAMPLE = 20967617548962139790724721831013389412
STREAM_AFTER_LOCALIZATION_SAMPLE = 283425554028312212913246414765404160975


def test_image_quality_off_leaves_samples_as_they_were_and_on_changes_only_the_image(phantom):
    """Off, nothing is drawn, whatever the quality ranges say. On, the same draws give the same
    labels and another image."""
    crop = (32, 32, 32)
    wild = fixed_quality(slice_mm=9.0, blur_mm=3.0, noise_hu=50.0)
    off = replace(wild, quality_probability=0.0)
    rng = np.random.default_rng(8)
    augment.segmentation_sample(phantom, rng, crop, off)
    assert rng.bit_generator.state["state"]["state"] == STREAM_AFTER_SEGMENTATION_SAMPLE
    rng = np.random.default_rng(8)
    augment.localization_sample(phantom, rng, off)
    assert rng.bit_generator.state["state"]["state"] == STREAM_AFTER_LOCALIZATION_SAMPLE

    base = augment.AugmentationRanges(slab_probability=0.0)
    image, labels = augment.segmentation_sample(phantom, np.random.default_rng(8), crop, base)
    same, same_labels = augment.segmentation_sample(
        phantom, np.random.default_rng(8), crop, replace(off, slab_probability=0.0))
    np.testing.assert_array_equal(same, image)
    np.testing.assert_array_equal(same_labels, labels)
    changed, changed_labels = augment.segmentation_sample(
        phantom, np.random.default_rng(8), crop, replace(wild, slab_probability=0.0))
    np.testing.assert_array_equal(changed_labels, labels)
    difference = (changed - image) * method.INTENSITY_DIVISOR_HU
    assert 40 < difference.std() < 200  # 50 HU of noise, the edges softened


def test_image_quality_share_must_be_a_share(tmp_path):
    from training.train import parse_args

    for share in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            parse_args(["--stage", "segmentation", "--run", str(tmp_path / "run"),
                        "--image-quality", share])
    assert parse_args(["--stage", "segmentation", "--run", str(tmp_path / "run"),
                       "--image-quality", "0.3"]).image_quality == 0.3


def count_h5_values(path):
    total = 0

    def visit(_, item):
        nonlocal total
        if isinstance(item, h5py.Dataset):
            total += int(np.prod(item.shape))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return total


def test_tiny_training_run_resumes_and_exports_exactly_the_model_variables(tmp_path, capsys):
    from training.store import held_bytes, load
    from training.train import main

    run = tmp_path / "run"
    common = ["--stage", "segmentation", "--run", str(run), "--generated", "2",
              "--generated-size", "64", "--validation", "1", "--crop-size", "32", "32", "32",
              "--checkpoint-every", "2", "--validate-every", "2", "--precision", "float32",
              "--workers", "1", "--image-quality", "0.5"]
    main(common + ["--iterations", "2"])
    assert json.loads((run / "args.json").read_text())["image_quality"] == 0.5
    # the run says what its cases hold in memory: here the SCN's images of its three cases
    held = held_bytes(load(entry, "segmentation") for entry in (run / "cache").iterdir())
    assert held > 3e6  # tens of MB: the 1.5 mm images around the organs
    assert f", {held / 1e6:,.0f} MB of images in memory (" in capsys.readouterr().out
    main(common + ["--iterations", "4", "--export", str(tmp_path / "weights")])
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    # iteration 0 scores the starting weights; the second run resumed at 2 and does not
    assert [row["iteration"] for row in rows] == ["0", "2", "4"]
    scores = json.loads(rows[-1]["validation"])
    assert scores and all(0.0 <= value <= 1.0 for value in scores.values())
    exported = tmp_path / "weights" / "segmentation.weights.h5"
    assert count_h5_values(exported) == method.SCN_PARAMETERS


def h5_values(path):
    values = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda _, item: values.append(item[()]) if isinstance(item, h5py.Dataset)
                     else None)
    return values


def test_snapshots_are_complete_weights_folders_of_the_ema_at_their_iteration(tmp_path,
                                                                            precision):
    # ``precision``: the run leaves Keras' policy at bfloat16; float32 is put back afterwards
    import keras

    from app.predictor import Predictor
    from app.weights import DEFAULT_WEIGHTS_DIR
    from training.train import main

    run = tmp_path / "run"
    # 64^3 crops as in training: with 32^3 crops (a tiny spatial branch) bfloat16 steps on
    # this CPU gave NaN or infinite gradient norms at random steps in 7 of 11 runs, 64^3 in 0 of 6
    main(["--stage", "segmentation", "--run", str(run), "--generated", "2",
          "--generated-size", "64", "--validation", "0", "--crop-size", "64", "64", "64",
          "--precision", "bfloat16", "--workers", "1", "--init-weights", str(DEFAULT_WEIGHTS_DIR),
          "--iterations", "2", "--snapshot-every", "1", "--export", str(tmp_path / "export")])
    # writing a snapshot builds a float32 network; training's policy must survive it
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    snapshots = run / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == ["000001", "000002"]
    assert (snapshots / "000001" / "localization.weights.h5").read_bytes() == \
        (DEFAULT_WEIGHTS_DIR / "localization.weights.h5").read_bytes()
    # the init's record, less its scores (not the snapshot's), naming run and iteration
    shipped = json.loads((DEFAULT_WEIGHTS_DIR / "weights.json").read_text())
    record = json.loads((snapshots / "000001" / "weights.json").read_text())
    assert "scores" in shipped and "scores" not in record
    assert record["segmentation"].pop("snapshot") == {"run": str(run), "iteration": 1}
    shipped.pop("scores")
    assert record == shipped
    last = h5_values(snapshots / "000002" / "segmentation.weights.h5")
    exported = h5_values(tmp_path / "export" / "segmentation.weights.h5")
    assert len(last) == len(exported) > 0
    assert all(np.array_equal(a, b) for a, b in zip(last, exported))
    earlier = h5_values(snapshots / "000001" / "segmentation.weights.h5")
    assert any(not np.array_equal(a, b) for a, b in zip(earlier, last))
    Predictor(snapshots / "000001")  # app/ loads a snapshot as it is


def test_a_short_localization_run_learns_what_held_out_cases_show(tmp_path):
    """100 iterations on 8 generated cases: the loss falls and the EMA weights find the organs of
    2 held-out generated cases. Measured on this 2-core CPU: loss 0.43 over the first 20
    iterations, 0.22 over the last 20; held-out foreground DSC 0.04 at 50 iterations (the EMA
    still near the initial weights), 0.59 at 100."""
    from training.train import main

    run = tmp_path / "run"
    main(["--stage", "localization", "--run", str(run), "--generated", "8",
          "--generated-size", "128", "--validation", "2", "--iterations", "100",
          "--learning-rate", "1e-4", "--validate-every", "50", "--checkpoint-every", "1000",
          "--precision", "float32", "--workers", "1"])
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(row["loss"]) for row in rows if row["loss"]]
    assert losses[-1] < 0.8 * losses[0], losses
    scores = [json.loads(row["validation"]) for row in rows if row["validation"]]
    assert [row["iteration"] for row in rows if row["validation"]] == ["0", "50", "100"]
    _, first, last = (score["foreground_dsc"] for score in scores)
    assert last >= 0.4 and last > first + 0.2, scores


@pytest.fixture
def precision():
    """Sets Keras' global dtype policy for a test and puts float32 back afterwards."""
    from training.train import set_precision

    yield set_precision
    set_precision("float32")


@pytest.mark.parametrize("stage", ["segmentation", "localization"])
def test_the_training_step_learns_one_sample(phantom, stage):
    """The compiled step (losses, clipping, Adam) fits one fixed sample within 60 steps: the loss
    falls and the predicted labels cover the sample's organs. (Held-out DSC needs hundreds of
    iterations: the SCN's first organ appeared after 500-750 on generated cases.)"""
    import keras
    import tensorflow as tf

    from app.networks import build_localization_net, build_scn
    from training.train import make_optimizer, make_train_step
    from training.validation import dice

    keras.utils.set_random_seed(0)
    segmentation = stage == "segmentation"
    rng = np.random.default_rng(1)
    none = augment.AugmentationRanges.none()
    if segmentation:
        image, labels = augment.segmentation_sample(phantom, rng, (32, 32, 32), none,
                                                    organ_centred=1.0)
    else:
        image, labels = augment.localization_sample(phantom, rng, none)
    assert labels.any() and not labels.all()
    model = build_scn() if segmentation else build_localization_net()
    optimizer = make_optimizer(5e-4 if segmentation else 1e-3, "float32")
    optimizer.build(model.trainable_variables)
    ema = [tf.Variable(v, trainable=False) for v in model.trainable_variables]
    step = make_train_step(model, optimizer, ema, tf.Variable(0, dtype=tf.int64),
                           tf.Variable(0.0), segmentation, 0.999)
    losses = [float(step(image[None, ..., None], labels[None])[0]) for _ in range(60)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    output = model(image[None, ..., None], training=False)
    predicted = np.argmax(output["probabilities"] if segmentation else output, axis=-1)[0]
    for label in np.unique(labels[labels > 0]):
        assert dice(predicted == label, labels == label) > 0.8, (label, losses[-5:])


def small_localization_sample(phantom):
    """A 16 x 32 x 32 part of the phantom's localization grid with foreground and background
    (float16 runs on this CPU through slow emulated kernels)."""
    image, labels = augment.localization_sample(phantom, np.random.default_rng(1),
                                                augment.AugmentationRanges.none(),
                                                max_size_zyx=(16, 32, 32))
    assert labels.any() and not labels.all()
    return image[None, ..., None], labels[None]


def localization_steps(precision_name, image, labels, steps, **scaling):
    """A fresh localization net (seed 0, no dropout, so that only the precision differs between
    runs) trained ``steps`` steps on one sample; returns the per-step (loss, norm), the model, its
    optimizer, the step and the step's state variables."""
    import keras
    import tensorflow as tf

    from app.networks import build_localization_net
    from training.train import make_optimizer, make_train_step, set_precision

    set_precision(precision_name)
    keras.utils.set_random_seed(0)
    model = build_localization_net()
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    optimizer = (keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3), **scaling)
                 if scaling else make_optimizer(1e-3, precision_name))
    optimizer.build(model.trainable_variables)
    ema = [tf.Variable(v, trainable=False) for v in model.trainable_variables]
    iteration, mean_norm = tf.Variable(0, dtype=tf.int64), tf.Variable(0.0)
    step = make_train_step(model, optimizer, ema, iteration, mean_norm, False, 0.999)
    history = [tuple(float(v) for v in step(image, labels)) for _ in range(steps)]
    return history, model, optimizer, step, iteration, mean_norm


def test_float16_with_loss_scaling_trains_as_float32_does(phantom, precision):
    image, labels = small_localization_sample(phantom)
    float32, *_ = localization_steps("float32", image, labels, 12)
    float16, _, optimizer, *_ = localization_steps("float16", image, labels, 12)
    assert float(optimizer.dynamic_scale) == 2.0 ** 15  # the default scale, never overflowed
    float32, float16 = np.array(float32), np.array(float16)
    assert float16[-4:, 0].max() < 0.6 * float16[0, 0], float16[:, 0]
    # the same path while the steps are large (later, lr 1e-3 makes both oscillate, and the
    # small differences of float16 decide which way)
    np.testing.assert_allclose(float16[:6, 0], float32[:6, 0], rtol=0.02)
    # the norm is that of the unscaled gradients (scaled, it would be 2**15 times larger; by the
    # sixth step float16's rounding has moved it a few per cent)
    np.testing.assert_allclose(float16[:6, 1], float32[:6, 1], rtol=0.1)


def test_a_float16_overflow_skips_the_step_and_halves_the_loss_scale(phantom, precision):
    image, labels = small_localization_sample(phantom)
    # a scale so large that the float16 gradients overflow
    history, model, optimizer, step, iteration, mean_norm = localization_steps(
        "float16", image, labels, 0, initial_scale=2.0 ** 40)
    before = [v.numpy() for v in model.trainable_variables]
    loss, norm = (float(v) for v in step(image, labels))
    assert np.isfinite(loss) and not np.isfinite(norm)
    assert all(np.array_equal(v.numpy(), b) for v, b in zip(model.trainable_variables, before))
    assert float(optimizer.dynamic_scale) == 2.0 ** 39
    assert float(mean_norm) == 0.0 and int(iteration) == 1
    for _ in range(30):  # the scale comes down until the gradients fit, then the weights move
        loss, norm = (float(v) for v in step(image, labels))
        if np.isfinite(norm):
            break
    assert np.isfinite(norm) and float(mean_norm) > 0
    assert float(optimizer.dynamic_scale) < 2.0 ** 39
    assert any(not np.array_equal(v.numpy(), b)
               for v, b in zip(model.trainable_variables, before))


def test_sample_pipeline_is_ordered_and_resumes_at_any_iteration(phantom):
    import time

    from training.train import sample_dataset

    def make_sample(rng):
        time.sleep(rng.uniform(0, 0.05))  # parallel map calls finish out of order
        return augment.segmentation_sample(phantom, rng, (32, 32, 32))

    def draw(first, count, workers):
        dataset = sample_dataset(make_sample, seed=3, workers=workers, first_index=first, depth=4)
        return [(image.numpy(), labels.numpy()) for image, labels in dataset.take(count)]

    uninterrupted = draw(0, 5, workers=3)
    resumed = draw(3, 2, workers=2)
    assert uninterrupted[0][0].shape == (1, 32, 32, 32, 1) and uninterrupted[0][1].shape == (
        1, 32, 32, 32)
    for (image, labels), (image_resumed, labels_resumed) in zip(uninterrupted[3:], resumed):
        np.testing.assert_array_equal(image, image_resumed)
        np.testing.assert_array_equal(labels, labels_resumed)
    assert not np.array_equal(uninterrupted[3][0], uninterrupted[4][0])
    expected_image, expected_labels = make_sample(np.random.default_rng([3, 4]))
    np.testing.assert_array_equal(uninterrupted[4][0][0, ..., 0], expected_image)
    np.testing.assert_array_equal(uninterrupted[4][1][0], expected_labels)


def test_bfloat16_on_a_cpu_without_native_bfloat16_is_warned_about():
    from training.train import precision_warning

    assert "emulated" in precision_warning("bfloat16", on_gpu=False, cpu_has_bfloat16=False)
    assert precision_warning("bfloat16", on_gpu=False, cpu_has_bfloat16=True) is None
    assert precision_warning("bfloat16", on_gpu=True, cpu_has_bfloat16=False) is None
    assert precision_warning("float32", on_gpu=False, cpu_has_bfloat16=False) is None
