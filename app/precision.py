"""Inference precision: which dtype the networks compute in, and which layers stay float32.

TensorFlow and Keras are imported inside the functions: importing this module costs nothing.
"""

from pathlib import Path

# Inference precisions: name -> Keras dtype policy of the networks' layers. "bfloat16" computes
# the convolutions in bfloat16 (float32 variables and accumulation; the output convolutions and
# everything after them stay float32, see FLOAT32_LAYERS). "float16" on GPUs could come later.
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
# Layers kept in float32 in every precision: the 1x1x1 output convolutions (names ending in
# "_prediction") and what follows them, so logits and probabilities are not rounded to 8 bits.
FLOAT32_LAYERS = ("local_sigmoid", "spatial_low", "spatial_up", "spatial_sigmoid",
                  "probabilities")


def cpu_has_bfloat16():
    """True where the CPU has native bfloat16 dot products (AVX512_BF16 or AMX) (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def default_precision():
    """bfloat16 on CPUs with native bfloat16 and no visible GPU, else float32.

    Measured on a 2-core AVX512_BF16 CPU (docs/speed.md): the SCN runs about twice
    as fast in bfloat16 and its labels agree with float32 on more than 99.9% of the voxels.
    On GPUs float32 stays the default until a float16 path is measured.
    """
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "float32"
    return "bfloat16" if cpu_has_bfloat16() else "float32"


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def build_networks(precision):
    """Both networks with layers in ``precision`` (a ``PRECISIONS`` key), weights not loaded.

    Keras takes the dtype policy from a global setting at layer creation; it is set for the
    build only and restored afterwards.
    """
    import keras

    from app.networks import build_localization_net, build_scn

    check_precision(precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[precision])
    try:
        localization_net, scn = build_localization_net(), build_scn()
    finally:
        keras.config.set_dtype_policy(previous)
    for model in (localization_net, scn):
        for layer in model.layers:
            if layer.name.endswith("_prediction") or layer.name in FLOAT32_LAYERS:
                layer.dtype_policy = "float32"
    return localization_net, scn
