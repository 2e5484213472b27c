"""Losses of the method (METHOD.md, "Training"). Tensors are (batch, z, y, x, classes)."""

import tensorflow as tf


def generalized_dice_loss(probabilities, one_hot, epsilon=1e-4):
    """1 - generalized Dice over the classes present in the labels (background included).

    Class weights 1 / (sum of label^2 + epsilon); squared terms in the denominator. A class absent
    from the labels gets weight 0: with the method's weights it would get 1 / epsilon and swamp the
    loss. The method trains on crops holding the whole ROI, where every organ is present and both
    rules agree; on smaller crops (CPU training) organs are often absent.
    """
    probabilities = tf.cast(probabilities, tf.float32)
    one_hot = tf.cast(one_hot, tf.float32)
    axes = [0, 1, 2, 3]
    squared_sums = tf.reduce_sum(one_hot**2, axis=axes)
    weights = tf.where(squared_sums > 0, 1.0 / (squared_sums + epsilon), 0.0)
    intersection = tf.reduce_sum(probabilities * one_hot, axis=axes)
    denominator = tf.reduce_sum(probabilities**2 + one_hot**2, axis=axes)
    return 1.0 - 2.0 * tf.reduce_sum(weights * intersection) / (
        tf.reduce_sum(weights * denominator) + epsilon)


def sigmoid_cross_entropy(logits, one_hot):
    """Mean sigmoid cross-entropy of every channel against the one-hot labels."""
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(one_hot, tf.float32), logits=tf.cast(logits, tf.float32)))


def scn_loss(outputs, one_hot):
    """Generalized Dice on the combined P + cross-entropy on local and on spatial logits."""
    return (generalized_dice_loss(outputs["probabilities"], one_hot)
            + sigmoid_cross_entropy(outputs["local_logits"], one_hot)
            + sigmoid_cross_entropy(outputs["spatial_logits"], one_hot))


def localization_loss(logits, one_hot):
    """Generalized Dice on the two-class softmax."""
    return generalized_dice_loss(tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1), one_hot)
