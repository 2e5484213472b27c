"""The two networks of the method: the localization U-Net and the SpatialConfiguration-Net.

Tensors are channels last with spatial axes in NumPy/SimpleITK array order: (batch, z, y, x,
channels). Architecture, sizes and creation order follow ../shared/METHOD.md ("Networks").

Layer names are stable and describe the place of each variable (for example
``local_appearance_contracting_2`` / ``conv_1``); the weight importer relies on them, not on the
order in which Keras lists the weights.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from app import method


def leaky_relu(x):
    """Leaky ReLU with the method's slope of 0.1 for negative inputs."""
    return keras.ops.leaky_relu(x, negative_slope=method.LEAKY_RELU_ALPHA)


class UNetBlock(keras.layers.Layer):
    """Conv 3x3x3 -> dropout -> conv 3x3x3 -> dropout, leaky ReLU inside each convolution."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.convs = [
            keras.layers.Conv3D(
                filters,
                3,
                padding="same",
                activation=leaky_relu,
                kernel_initializer="he_normal",
                kernel_regularizer=keras.regularizers.L2(method.WEIGHT_DECAY),
                name=f"conv_{i}",
            )
            for i in range(2)
        ]
        self.dropouts = [keras.layers.Dropout(method.DROPOUT_RATE) for _ in range(2)]

    def build(self, input_shape):
        shape = input_shape
        for conv in self.convs:
            conv.build(shape)
            shape = (*shape[:-1], self.filters)

    def call(self, x, training=None):
        for conv, dropout in zip(self.convs, self.dropouts):
            x = dropout(conv(x), training=training)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)


def _keys_cubic(distance, a=-0.5):
    s = abs(distance)
    if s <= 1:
        return (a + 2) * s**3 - (a + 3) * s**2 + 1
    if s < 2:
        return a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a
    return 0.0


def _tent(distance):
    return max(0.0, 1.0 - abs(distance))


def upsampling_weights(factor, kernel):
    """Weights of the fixed upsampling, shape (factor, 5): output phase by input tap -2..+2.

    Output sample i of an input cell sits (1 - f + 2i) / (2f) input voxels from the cell centre
    (METHOD.md, "Fixed interpolation upsampling"); the kernel is evaluated at its distance to the
    five nearest input voxels.
    """
    function = {"linear": _tent, "cubic": _keys_cubic}[kernel]
    weights = np.zeros((factor, 5))
    for phase in range(factor):
        offset = (1 - factor + 2 * phase) / (2 * factor)
        for tap in range(-2, 3):
            weights[phase, tap + 2] = function(offset - tap)
    return weights


def fixed_upsampling(x, factor, kernel):
    """Upsample (batch, z, y, x, channels) by ``factor`` along z, y and x with the fixed
    ``kernel`` ("linear" or "cubic", see ``upsampling_weights``); borders replicate."""
    if kernel == "linear":
        return _linear_upsampling(x, factor)
    weights_per_phase = upsampling_weights(factor, kernel)
    for axis in (1, 2, 3):
        x = _upsample_axis(x, axis, factor, weights_per_phase)
    return x


def _linear_upsampling(x, factor):
    # Bilinear resizing with half-pixel centres samples exactly the method's positions, with
    # clamped (replicated) borders: one resize over (y, x) planes, one over z. Few graph
    # operations (the U-Nets upsample 19 times) and faster than weighted neighbour sums.
    shape = tf.shape(x)
    batch, depth, height, width, channels = (shape[i] for i in range(5))
    planes = tf.reshape(x, tf.stack([batch * depth, height, width, channels]))
    planes = tf.image.resize(planes, tf.stack([height * factor, width * factor]), "bilinear")
    columns = tf.reshape(planes, tf.stack([batch, depth, height * width * factor**2, channels]))
    columns = tf.image.resize(columns, tf.stack([depth * factor, height * width * factor**2]),
                              "bilinear")
    upsampled = tf.reshape(columns, tf.stack([batch, depth * factor, height * factor,
                                              width * factor, channels]))
    return tf.cast(upsampled, x.dtype)  # resizing computes in float32


def _upsample_axis(x, axis, factor, weights_per_phase):
    # Neighbours at tap offsets -2..+2 are gathered with clipped indices (replicated borders):
    # far fewer graph operations to trace than slicing a padded copy, and faster to run.
    shape = tf.shape(x)
    length = shape[axis]
    positions = tf.range(length)
    neighbours = {}
    phases = []
    for phase_weights in weights_per_phase:
        total = None
        for index, weight in enumerate(phase_weights):
            if abs(weight) < 1e-12:
                continue
            tap = index - 2
            if tap not in neighbours:
                neighbours[tap] = x if tap == 0 else tf.gather(
                    x, tf.clip_by_value(positions + tap, 0, length - 1), axis=axis)
            term = float(weight) * neighbours[tap]
            total = term if total is None else total + term
        phases.append(total)
    stacked = tf.stack(phases, axis=axis + 1)
    return tf.reshape(stacked, tf.concat([shape[:axis], [length * factor], shape[axis + 1:]], 0))


class FixedUpsampling(keras.layers.Layer):
    """Separable upsampling by an integer factor with a fixed kernel; borders replicate.

    Works on (batch, z, y, x, channels); no trainable variables.
    """

    def __init__(self, factor, kernel, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor
        self.kernel = kernel

    def call(self, x):
        return fixed_upsampling(x, self.factor, self.kernel)

    def compute_output_shape(self, input_shape):
        scaled = [None if n is None else n * self.factor for n in input_shape[1:4]]
        return (input_shape[0], *scaled, input_shape[4])


def unet(x, levels, filters, name):
    """A U-Net with the same number of filters at every level; returns the last block's features.

    Blocks are created in the published order (contracting 0..L-1, then expanding 0..L-1) so that
    the layer list matches the published variable order. Spatial sizes must be divisible by
    2**(levels - 1).
    """
    contracting = [UNetBlock(filters, name=f"{name}_contracting_{i}") for i in range(levels)]
    expanding = [UNetBlock(filters, name=f"{name}_expanding_{i}") for i in range(levels)]
    skips = []
    for level in range(levels):
        x = contracting[level](x)
        if level < levels - 1:
            skips.append(x)
            x = average_pooling(2, f"{name}_down_{level}")(x)
    x = expanding[levels - 1](x)
    for level in reversed(range(levels - 1)):
        x = FixedUpsampling(2, "linear", name=f"{name}_up_{level}")(x)
        x = keras.layers.Concatenate(name=f"{name}_concat_{level}")([skips[level], x])
        x = expanding[level](x)
    return x


def average_pooling(size, name):
    """3-D average pooling; in float32 under a float16 policy (TensorFlow's CPU kernels have no
    float16 AvgPool3D, and a float32 sum of the window is more exact), else in the policy's type."""
    policy = keras.mixed_precision.dtype_policy()
    dtype = "float32" if policy.compute_dtype == "float16" else None
    return keras.layers.AveragePooling3D(size, name=name, dtype=dtype)


def output_conv(channels, name):
    """1x1x1 convolution to the output channels (linear)."""
    return keras.layers.Conv3D(
        channels,
        1,
        kernel_initializer="he_normal",
        kernel_regularizer=keras.regularizers.L2(method.WEIGHT_DECAY),
        name=name,
    )


def build_localization_net():
    """Localization U-Net: (b, z, y, x, 1) scaled CT at 6 mm -> (b, z, y, x, 2) logits (bg, fg)."""
    image = keras.Input((None, None, None, 1), name="image")
    features = unet(image, method.LOCALIZATION_LEVELS, method.LOCALIZATION_FILTERS, "localization")
    logits = output_conv(2, "localization_prediction")(features)
    return keras.Model(image, logits, name="localization")


class SpatialInputNoise(keras.layers.Layer):
    """Training-only corruption of the spatial configuration input (METHOD.md, "Training").

    Input channels: [image, liver, kidney, spleen, pancreas]. Salt-and-pepper noise (rate 0.01 at
    scales 1, 2, 4, 8 voxels) and channel dropout 0.25 on the organ maps, dropout 0.5 on the image
    channel. The identity outside training.
    """

    def __init__(self, rate=0.01, scales=(1, 2, 4, 8), organ_dropout=0.25, image_dropout=0.5,
                 **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.scales = scales
        self.organ_dropout = organ_dropout
        self.image_dropout = image_dropout

    def call(self, x, training=None):
        if not training:
            return x
        image, organs = x[..., :1], x[..., 1:]
        shape = tf.shape(organs)
        for scale in self.scales:
            coarse = tf.stack([shape[0], *(-(-shape[i] // scale) for i in (1, 2, 3)), shape[4]])
            hit = tf.random.uniform(coarse) < self.rate
            value = tf.cast(tf.random.uniform(coarse) < 0.5, organs.dtype)
            for axis in (1, 2, 3):
                hit = tf.repeat(hit, scale, axis=axis)
                value = tf.repeat(value, scale, axis=axis)
            hit = hit[:, : shape[1], : shape[2], : shape[3]]
            value = value[:, : shape[1], : shape[2], : shape[3]]
            organs = tf.where(hit, value, organs)
        keep = tf.cast(tf.random.uniform([shape[0], 1, 1, 1, shape[4]]) >= self.organ_dropout,
                       organs.dtype)
        organs = organs * keep
        image = image * tf.cast(tf.random.uniform([shape[0], 1, 1, 1, 1]) >= self.image_dropout,
                                image.dtype)
        return tf.concat([image, organs], axis=-1)


def uncertainty_combination(local, spatial):
    """P = L*u + S*(1 - u), u the binary entropy of S in bits, normalised over channels
    (float32)."""
    local = tf.cast(local, tf.float32)
    spatial = tf.cast(spatial, tf.float32)
    eps = 1e-7
    s = tf.clip_by_value(spatial, eps, 1.0 - eps)
    uncertainty = -(s * tf.math.log(s) + (1.0 - s) * tf.math.log(1.0 - s)) / math.log(2.0)
    combined = local * uncertainty + spatial * (1.0 - uncertainty)
    return combined / (tf.reduce_sum(combined, axis=-1, keepdims=True) + eps)


class UncertaintyCombination(keras.layers.Layer):
    """P = L*u + S*(1 - u) with u the binary entropy of S in bits, normalised over channels.

    Computed in float32 whatever the global precision policy: in bfloat16, 1 - 1e-7 rounds to 1
    and the entropy of a saturated S becomes 0 * log(0) = NaN.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, local, spatial):
        return uncertainty_combination(local, spatial)


def build_scn():
    """SpatialConfiguration-Net: (b, z, y, x, 1) scaled CT at 2 mm -> three outputs.

    Outputs (all (b, z, y, x, 5), channels background, liver, kidney, spleen, pancreas):
    ``local_logits`` of the local appearance net, ``spatial_logits`` of the spatial configuration
    net after the fixed cubic 4x upsampling, and ``probabilities``, their uncertainty-weighted
    combination. Spatial sizes must be multiples of 32.
    """
    image = keras.Input((None, None, None, 1), name="image")
    features = unet(image, method.LOCAL_APPEARANCE_LEVELS, method.LOCAL_APPEARANCE_FILTERS,
                    "local_appearance")
    local_logits = output_conv(method.NUM_CLASSES, "local_appearance_prediction")(features)
    local = keras.layers.Activation("sigmoid", name="local_sigmoid")(local_logits)

    pool = method.SPATIAL_DOWNSAMPLING
    organs = keras.layers.Lambda(lambda t: tf.stop_gradient(t[..., 1:]), name="organ_maps")(local)
    organs_low = average_pooling(pool, "organs_down")(organs)
    image_low = average_pooling(pool, "image_down")(image)
    spatial_input = keras.layers.Concatenate(name="spatial_input")([image_low, organs_low])
    spatial_input = SpatialInputNoise(name="spatial_noise")(spatial_input)

    organ_names = [method.LABELS[k] for k in sorted(method.LABELS)]
    spatial_outputs = {}
    for index, organ in enumerate(organ_names):  # published creation order: liver .. pancreas
        others = [1 + i for i in range(len(organ_names)) if i != index]
        net_input = keras.layers.Lambda(
            lambda t, channels=[0, *others]: tf.gather(t, channels, axis=-1),
            name=f"spatial_{organ}_input")(spatial_input)
        net = unet(net_input, method.SPATIAL_LEVELS, method.SPATIAL_FILTERS, f"spatial_{organ}")
        spatial_outputs[organ] = output_conv(1, f"spatial_{organ}_prediction")(net)
    net = unet(spatial_input, method.SPATIAL_LEVELS, method.SPATIAL_FILTERS, "spatial_background")
    spatial_outputs["background"] = output_conv(1, "spatial_background_prediction")(net)

    spatial_low = keras.layers.Concatenate(name="spatial_low")(
        [spatial_outputs[name] for name in ["background", *organ_names]])
    spatial_logits = FixedUpsampling(pool, "cubic", name="spatial_up")(spatial_low)
    spatial = keras.layers.Activation("sigmoid", name="spatial_sigmoid")(spatial_logits)
    probabilities = UncertaintyCombination(name="probabilities")(local, spatial)
    return keras.Model(
        image,
        {"local_logits": local_logits, "spatial_logits": spatial_logits,
         "probabilities": probabilities},
        name="scn",
    )


BUILDERS = {"localization": build_localization_net, "segmentation": build_scn}
