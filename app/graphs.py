"""Both networks as plain TensorFlow functions of their weight arrays, for inference.

The Keras models of app/networks.py define the networks, train them and write the weights files.
Building them and tracing their ``tf.function`` costs seconds of Python per process (about 1 s to
build, 0.5 s to load, 3 s to trace the SCN here), which a single case pays in full. These
functions compute the same outputs with bare TensorFlow operations over arrays read straight
from the ``.weights.h5`` files: no Keras object, and a trace of a fraction of a second. A test
checks them against the Keras models for both precisions.

Weights files: Keras names a variable in ``.weights.h5`` by the position of its layer in the
model (``layers/u_net_block_7/convs/conv3d_1/vars/0``), not by the layer's name. ``LAYOUT_FILE``
maps those places to our variable paths (``local_appearance_expanding_2/conv_1/kernel``);
``python -m release.layout --write`` derives it from the Keras models, and a test keeps it
equal to what they write.
"""

import json
from pathlib import Path

import numpy as np

from app import method

LAYOUT_FILE = Path(__file__).resolve().with_name("weights_layout.json")
ORGANS = [method.LABELS[label] for label in sorted(method.LABELS)]


class WeightsError(ValueError):
    """A weights file that does not hold exactly the network's variables."""


def layout_of_file(network):
    """{place in a .weights.h5 file: [variable path, shape]} of ``network``, from LAYOUT_FILE."""
    return json.loads(LAYOUT_FILE.read_text())[network]


def read_weights(path, network):
    """{variable path: float32 array} of ``network`` ("localization" or "segmentation") from
    a Keras ``.weights.h5`` file; every variable present with its shape, nothing else."""
    import h5py

    layout = layout_of_file(network)
    values = {}
    try:
        with h5py.File(path, "r") as h5:
            found = []
            h5.visititems(lambda name, item: found.append(name)
                          if isinstance(item, h5py.Dataset) else None)
            problems = []
            missing = sorted(set(layout) - set(found))
            if missing:
                problems.append(f"{len(missing)} variables missing, e.g. {missing[0]}")
            unexpected = sorted(set(found) - set(layout))
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
            if problems:
                raise WeightsError(f"{path}: not the {network} network's weights "
                                   f"({'; '.join(problems)})")
            for place, (variable, shape) in layout.items():
                array = np.asarray(h5[place], dtype=np.float32)
                if list(array.shape) != shape:
                    raise WeightsError(f"{path}: {variable} has shape {list(array.shape)}, "
                                       f"the network needs {shape}")
                values[variable] = array
    except OSError as error:
        raise WeightsError(f"{path}: not a readable weights file ({error})") from None
    return values


class Weights:
    """Weight arrays as tensors, cast once: 3x3x3 convolutions in ``compute_dtype``, the 1x1x1
    output convolutions in float32 (as the Keras models keep them, see app/predictor.py)."""

    def __init__(self, values, compute_dtype):
        import tensorflow as tf

        self.dtype = compute_dtype
        self.tensors = {}
        for path, array in values.items():
            dtype = tf.float32 if path.split("/")[0].endswith("_prediction") else compute_dtype
            self.tensors[path] = tf.constant(array, dtype=dtype)

    def conv(self, x, name, activation=True):
        """Convolution ``name`` ("same" padding) + bias, leaky ReLU unless ``activation`` is off;
        the input is cast to the convolution's dtype."""
        import tensorflow as tf

        kernel = self.tensors[f"{name}/kernel"]
        x = tf.cast(x, kernel.dtype)
        y = tf.nn.conv3d(x, kernel, strides=[1] * 5, padding="SAME") + self.tensors[f"{name}/bias"]
        return tf.nn.leaky_relu(y, alpha=method.LEAKY_RELU_ALPHA) if activation else y


def _unet(x, weights, levels, name):
    """The U-Net of app/networks.py ``unet`` at inference (dropout off)."""
    import tensorflow as tf

    from app.networks import fixed_upsampling

    def block(t, block_name):
        return weights.conv(weights.conv(t, f"{block_name}/conv_0"), f"{block_name}/conv_1")

    skips = []
    for level in range(levels):
        x = block(x, f"{name}_contracting_{level}")
        if level < levels - 1:
            skips.append(x)
            x = tf.nn.avg_pool3d(x, 2, 2, "VALID")
    x = block(x, f"{name}_expanding_{levels - 1}")
    for level in reversed(range(levels - 1)):
        x = tf.concat([skips[level], fixed_upsampling(x, 2, "linear")], axis=-1)
        x = block(x, f"{name}_expanding_{level}")
    return x


def localization_logits(x, weights):
    """(b, z, y, x, 1) scaled CT at 6 mm -> (b, z, y, x, 2) float32 logits (background, organ)."""
    features = _unet(x, weights, method.LOCALIZATION_LEVELS, "localization")
    return weights.conv(features, "localization_prediction", activation=False)


def scn_probabilities(x, weights):
    """(b, z, y, x, 1) scaled CT at 2 mm -> (b, z, y, x, 5) float32 combined probabilities."""
    import tensorflow as tf

    from app.networks import fixed_upsampling, uncertainty_combination

    image = tf.cast(x, weights.dtype)
    features = _unet(image, weights, method.LOCAL_APPEARANCE_LEVELS, "local_appearance")
    local = tf.sigmoid(weights.conv(features, "local_appearance_prediction", activation=False))
    pool = method.SPATIAL_DOWNSAMPLING
    organs_low = tf.nn.avg_pool3d(tf.cast(local[..., 1:], weights.dtype), pool, pool, "VALID")
    spatial_input = tf.concat([tf.nn.avg_pool3d(image, pool, pool, "VALID"), organs_low], axis=-1)
    outputs = {}
    for index, organ in enumerate(ORGANS):
        channels = [0, *(1 + i for i in range(len(ORGANS)) if i != index)]
        net = _unet(tf.gather(spatial_input, channels, axis=-1), weights, method.SPATIAL_LEVELS,
                    f"spatial_{organ}")
        outputs[organ] = weights.conv(net, f"spatial_{organ}_prediction", activation=False)
    net = _unet(spatial_input, weights, method.SPATIAL_LEVELS, "spatial_background")
    outputs["background"] = weights.conv(net, "spatial_background_prediction", activation=False)
    spatial_low = tf.concat([outputs[name] for name in ["background", *ORGANS]], axis=-1)
    spatial = tf.sigmoid(fixed_upsampling(spatial_low, pool, "cubic"))
    return uncertainty_combination(local, spatial)
