"""The training losses behave as their definitions say."""

import numpy as np
import pytest
import tensorflow as tf

from training.losses import generalized_dice_loss, localization_loss, scn_loss


def one_hot(labels, classes=5):
    return tf.one_hot(labels, classes).numpy()


def test_generalized_dice_is_zero_for_a_perfect_prediction_and_one_for_a_disjoint_one():
    labels = np.zeros((1, 4, 4, 4), int)
    labels[0, :2] = 1
    target = one_hot(labels, 2)
    assert float(generalized_dice_loss(target, target)) == pytest.approx(0.0, abs=1e-4)
    assert float(generalized_dice_loss(1.0 - target, target)) == pytest.approx(1.0, abs=1e-4)


def test_an_absent_class_does_not_change_the_generalized_dice():
    labels = np.zeros((1, 4, 4, 4), int)
    labels[0, :2] = 1
    rng = np.random.default_rng(0)
    two = rng.dirichlet([1, 1], size=(1, 4, 4, 4)).astype(np.float32)
    three = np.concatenate([two * 0.9, np.full((1, 4, 4, 4, 1), 0.1, np.float32)], axis=-1)
    with_absent = float(generalized_dice_loss(three, one_hot(labels, 3)))
    # the absent class's probability mass is ignored; what remains is scaled by 0.9
    expected = float(generalized_dice_loss(two * 0.9, one_hot(labels, 2)))
    assert with_absent == pytest.approx(expected, rel=1e-5)


def test_scn_and_localization_losses_fall_as_predictions_improve():
    labels = np.zeros((1, 8, 8, 8), int)
    labels[0, 2:6, 2:6, 2:6] = 1
    labels[0, 0, 0, :4] = 4
    target = one_hot(labels)
    good = {"probabilities": target * 0.9 + 0.02, "local_logits": (target - 0.5) * 8,
            "spatial_logits": (target - 0.5) * 8}
    bad = {"probabilities": np.full_like(target, 0.2), "local_logits": np.zeros_like(target),
           "spatial_logits": np.zeros_like(target)}
    assert float(scn_loss(good, target)) < float(scn_loss(bad, target))
    fg = one_hot(labels > 0, 2)
    assert (float(localization_loss((fg - 0.5) * 10, fg))
            < float(localization_loss(np.zeros_like(fg), fg)))
