"""Losses of the method (METHOD.md, "Training"). Tensors are (batch, z, y, x, classes).

Partial labels. A case whose label covers only some organs (training/coverage.py) passes its
``coverage``: float (batch, classes), 1 for background and each covered organ, 0 for an organ
the label does not cover. Where such a label says background, the voxel is background OR an
uncovered organ, and the losses must prefer neither. Each loss is then the marginal one: the
uncovered organs' probability is merged into the background's (for the sigmoid outputs, whose
channels are independent, the undecided channels get no loss there); covered organs still
exclude each other and the uncovered ones. ``coverage=None`` or all ones gives exactly the
method's losses.

Ignored voxels. A pseudo-labelled case (training/pseudo_label.py) marks voxels whose label is
uncertain; its ``voxel_mask`` (batch, z, y, x, 1), 1 where the label is known and 0 where it is
ignored, leaves them out of every loss: they add nothing to the Dice's sums nor to the
cross-entropies, and the losses' gradients there are zero. Means stay over all voxels (as for
partial labels), so a known voxel weighs what it weighs in a fully known case; ``voxel_mask=None``
or all ones gives exactly the losses without it.
"""

import tensorflow as tf


def _coverage(coverage, classes):
    """Coverage (batch, 1, 1, 1, classes) float32 and whether any organ is uncovered
    (batch, 1, 1, 1, 1)."""
    coverage = tf.reshape(tf.cast(coverage, tf.float32), [-1, 1, 1, 1, classes])
    return coverage, tf.reduce_min(coverage, axis=-1, keepdims=True) < 1.0


def merge_uncovered(values, coverage):
    """``values`` (probabilities or one-hot labels) with each uncovered organ's channel added
    to the background's (channel 0) and set to 0.

    An exact identity where everything is covered (x * 1 + 0), so fully labelled cases keep
    their loss bit for bit; no matrix product, which GPUs may round to TF32.
    """
    classes = values.shape[-1]
    coverage, _ = _coverage(coverage, classes)
    background = tf.one_hot(0, classes, dtype=values.dtype)
    uncovered = tf.reduce_sum(values * (1.0 - coverage), axis=-1, keepdims=True)
    return values * coverage + uncovered * background


def generalized_dice_loss(probabilities, one_hot, epsilon=1e-4, coverage=None, voxel_mask=None):
    """1 - generalized Dice over the classes present in the labels (background included).

    Class weights 1 / (sum of label^2 + epsilon); squared terms in the denominator. A class absent
    from the labels gets weight 0: with the method's weights it would get 1 / epsilon and swamp the
    loss. The method trains on crops holding the whole ROI, where every organ is present and both
    rules agree; on smaller crops (CPU training) organs are often absent.

    ``coverage`` (batch, classes): uncovered organs are merged into background in both the
    probabilities and the labels (``merge_uncovered``); their channels are then empty and weigh
    nothing. ``voxel_mask`` (batch, z, y, x, 1), 0 or 1: voxels whose class is unknown, left out
    of every sum.
    """
    probabilities = tf.cast(probabilities, tf.float32)
    one_hot = tf.cast(one_hot, tf.float32)
    if coverage is not None:
        probabilities = merge_uncovered(probabilities, coverage)
        one_hot = merge_uncovered(one_hot, coverage)
    if voxel_mask is not None:
        voxel_mask = tf.cast(voxel_mask, tf.float32)
        probabilities, one_hot = probabilities * voxel_mask, one_hot * voxel_mask
    axes = [0, 1, 2, 3]
    squared_sums = tf.reduce_sum(one_hot**2, axis=axes)
    weights = tf.where(squared_sums > 0, 1.0 / (squared_sums + epsilon), 0.0)
    intersection = tf.reduce_sum(probabilities * one_hot, axis=axes)
    denominator = tf.reduce_sum(probabilities**2 + one_hot**2, axis=axes)
    return 1.0 - 2.0 * tf.reduce_sum(weights * intersection) / (
        tf.reduce_sum(weights * denominator) + epsilon)


def _known(voxel_mask):
    return None if voxel_mask is None else tf.cast(voxel_mask, tf.float32)


def sigmoid_cross_entropy(logits, one_hot, coverage=None, voxel_mask=None):
    """Mean sigmoid cross-entropy of every channel against the one-hot labels.

    With ``coverage``: where the merged label is background (background or an uncovered organ),
    the background channel and the uncovered organs' channels are undecided and get no loss;
    every other voxel and channel keeps its term (covered organs: known everywhere; uncovered
    organs: known absent inside covered organs). The mean stays over all terms, so each known
    term weighs what it weighs in a fully labelled case. ``voxel_mask`` (batch, z, y, x, 1):
    every channel of a voxel where it is 0 gets no loss.
    """
    logits = tf.cast(logits, tf.float32)
    one_hot = tf.cast(one_hot, tf.float32)
    voxel_mask = _known(voxel_mask)
    if coverage is None:
        terms = tf.nn.sigmoid_cross_entropy_with_logits(labels=one_hot, logits=logits)
        return tf.reduce_mean(terms if voxel_mask is None else voxel_mask * terms)
    classes = one_hot.shape[-1]
    one_hot = merge_uncovered(one_hot, coverage)
    channel_known, partial = _coverage(coverage, classes)
    # the background channel is known only where every organ is covered
    channel_known = tf.concat([1.0 - tf.cast(partial, tf.float32), channel_known[..., 1:]], -1)
    known = tf.maximum(channel_known, 1.0 - one_hot[..., :1])
    if voxel_mask is not None:
        known = known * voxel_mask
    return tf.reduce_mean(known * tf.nn.sigmoid_cross_entropy_with_logits(labels=one_hot,
                                                                          logits=logits))


def scn_loss(outputs, one_hot, coverage=None, voxel_mask=None):
    """Generalized Dice on the combined P + cross-entropy on local and on spatial logits; each
    marginal over the organs ``coverage`` leaves out, each without the voxels ``voxel_mask``
    ignores."""
    return (generalized_dice_loss(outputs["probabilities"], one_hot, coverage=coverage,
                                  voxel_mask=voxel_mask)
            + sigmoid_cross_entropy(outputs["local_logits"], one_hot, coverage, voxel_mask)
            + sigmoid_cross_entropy(outputs["spatial_logits"], one_hot, coverage, voxel_mask))


def localization_loss(logits, one_hot, coverage=None, voxel_mask=None):
    """Generalized Dice on the two-class softmax (background, any organ).

    With ``coverage`` (batch, organ classes) leaving an organ out, a voxel the label calls
    background may be that organ, i.e. foreground: its marginal (background or foreground) is
    certain, so it carries no information and is left out of the loss; only the labelled organ
    voxels (foreground for sure) count. Rejected alternatives: calling soft-tissue HU or voxels
    near the labelled organs unknown and the rest background guesses where organs lie (contrast
    phase, intensity augmentation and anatomy vary), and would push real organs to background
    when it guesses wrong. Background is learned from the fully labelled cases.

    ``voxel_mask`` (batch, z, y, x, 1): voxels where it is 0 are left out as well.
    """
    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
    voxel_mask = _known(voxel_mask)
    if coverage is None:
        return generalized_dice_loss(probabilities, one_hot, voxel_mask=voxel_mask)
    _, partial = _coverage(coverage, coverage.shape[-1])
    foreground = tf.cast(one_hot, tf.float32)[..., 1:2]
    known = tf.maximum(1.0 - tf.cast(partial, tf.float32), foreground)
    if voxel_mask is not None:
        known = known * voxel_mask
    return generalized_dice_loss(probabilities, one_hot, voxel_mask=known)
