"""The networks match METHOD.md: parameter counts, fixed upsampling, combination rule."""

import numpy as np
import pytest
import tensorflow as tf

from app import method, networks
from app.networks import FixedUpsampling, UncertaintyCombination, build_localization_net, build_scn


@pytest.fixture(scope="module")
def scn():
    return build_scn()


def test_localization_net_has_the_published_parameter_count():
    assert build_localization_net().count_params() == method.LOCALIZATION_PARAMETERS == 637_474


def test_scn_has_the_published_parameter_count(scn):
    assert scn.count_params() == method.SCN_PARAMETERS == 1_270_090


def test_scn_parts_have_the_published_parameter_counts(scn):
    local = sum(int(np.prod(w.shape)) for w in scn.weights if w.path.startswith("local_appearance"))
    spatial = sum(int(np.prod(w.shape)) for w in scn.weights if w.path.startswith("spatial_"))
    assert (local, spatial) == (637_573, 632_517)


def test_linear_2x_upsampling_equals_half_pixel_bilinear_resize():
    x = np.random.default_rng(0).normal(size=(1, 4, 6, 5, 3)).astype(np.float32)
    ours = FixedUpsampling(2, "linear")(x).numpy()
    # per axis, tf.image.resize bilinear (half-pixel centres, clamped edges) is the reference
    expected = x
    for axis in (1, 2, 3):
        moved = np.moveaxis(expected, axis, 1)  # (b, n, a, b', c) -> resize axis 1 only
        b, n, p, q, c = moved.shape
        flat = moved.reshape(b, n, p * q, c)
        resized = tf.image.resize(flat, (2 * n, p * q), method="bilinear").numpy()
        expected = np.moveaxis(resized.reshape(b, 2 * n, p, q, c), 1, axis)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_linear_upsampling_by_resizing_equals_the_tent_kernel_taps(factor):
    x = np.random.default_rng(factor).normal(size=(2, 5, 6, 7, 3)).astype(np.float32)
    taps = x
    for axis in (1, 2, 3):  # the per-phase weighted neighbour sums, as for the cubic kernel
        taps = networks._upsample_axis(taps, axis, factor,
                                       networks.upsampling_weights(factor, "linear"))
    ours = networks.fixed_upsampling(x, factor, "linear").numpy()
    assert ours.shape == (2, 5 * factor, 6 * factor, 7 * factor, 3)
    np.testing.assert_allclose(ours, taps.numpy(), atol=1e-5)


def test_cubic_4x_upsampling_equals_bicubic_resize_inside():
    x = np.random.default_rng(1).normal(size=(1, 6, 7, 8, 2)).astype(np.float32)
    ours = FixedUpsampling(4, "cubic")(x).numpy()
    expected = x
    for axis in (1, 2, 3):
        padded = np.concatenate([np.take(expected, [0, 0], axis=axis), expected,
                                 np.take(expected, [-1, -1], axis=axis)], axis=axis)
        moved = np.moveaxis(padded, axis, 1)
        b, n, p, q, c = moved.shape
        flat = moved.reshape(b, n, p * q, c)
        resized = tf.image.resize(flat, (4 * n, p * q), method="bicubic").numpy()
        resized = resized[:, 8:-8]  # METHOD.md: edge-pad by 2, crop 8 output voxels per end
        expected = np.moveaxis(resized.reshape(b, resized.shape[1], p, q, c), 1, axis)
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_upsampling_keeps_constants_and_the_mean_position():
    constant = np.full((1, 3, 3, 3, 1), 7.0, np.float32)
    np.testing.assert_allclose(FixedUpsampling(4, "cubic")(constant).numpy(), 7.0, atol=1e-5)
    ramp = np.arange(4, dtype=np.float32)[None, :, None, None, None] * np.ones((1, 4, 2, 2, 1),
                                                                              np.float32)
    up = FixedUpsampling(2, "linear")(ramp).numpy()[0, :, 0, 0, 0]
    # interior samples of a ramp lie on the ramp at offsets -1/4, +1/4 of each cell
    np.testing.assert_allclose(up[1:-1], np.arange(1, 7) / 2.0 - 0.25, atol=1e-6)


def test_combination_trusts_local_where_spatial_is_uncertain():
    local = np.array([[0.1, 0.9, 0.2, 0.3, 0.4]], np.float32)
    spatial = np.array([[0.5, 0.5, 0.5, 0.5, 0.5]], np.float32)
    combined = UncertaintyCombination()(local, spatial).numpy()
    np.testing.assert_allclose(combined, local / local.sum(), atol=1e-5)
    certain = np.array([[0.0, 1.0, 0.0, 0.0, 0.0]], np.float32)
    combined = UncertaintyCombination()(local, certain).numpy()
    np.testing.assert_allclose(combined, certain, atol=1e-4)


def test_scn_outputs_are_normalised_probabilities_of_input_size(scn):
    x = np.random.default_rng(2).uniform(-0.5, 0.5, (1, 32, 64, 32, 1)).astype(np.float32)
    outputs = scn(x, training=False)
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        name: (1, 32, 64, 32, 5) for name in ("local_logits", "spatial_logits", "probabilities")}
    np.testing.assert_allclose(outputs["probabilities"].numpy().sum(-1), 1.0, atol=1e-4)


def test_combination_is_finite_for_saturated_bfloat16_inputs():
    # mixed-precision training feeds bfloat16 sigmoids that reach exactly 0 and 1
    local = tf.constant([[0.2, 0.9, 0.0, 1.0, 0.1]], tf.bfloat16)
    spatial = tf.constant([[0.0, 1.0, 0.0, 1.0, 0.0]], tf.bfloat16)
    with tf.GradientTape() as tape:
        tape.watch(spatial)
        combined = UncertaintyCombination()(local, spatial)
        total = tf.reduce_sum(combined * tf.constant([[0.0, 1.0, 0.0, 0.0, 0.0]]))
    gradient = tape.gradient(total, spatial)
    assert combined.dtype == tf.float32
    assert np.all(np.isfinite(combined.numpy())) and np.all(np.isfinite(gradient.numpy()))
    np.testing.assert_allclose(combined.numpy(), [[0, 0.5, 0, 0.5, 0]], atol=1e-4)
