"""Training on several devices (tf.distribute.MirroredStrategy) on this CPU, split into two logical
devices: one step over two replicas must equal one device applying the mean gradient of the two
samples, and a whole run must go through with ``--devices``.

The logical devices must be made before TensorFlow starts, so the checks run in a fresh process.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a training run on two devices (make test-fast skips it)

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, sys
import numpy as np
import keras
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from app import method
from app.networks import SpatialInputNoise, build_scn
from training import losses
from training.train import distribution_strategy, main, make_train_step

run_folder = sys.argv[1]
result = {}
strategy = distribution_strategy(["/cpu:0", "/cpu:1"])
result["replicas"] = strategy.num_replicas_in_sync


def without_randomness(model):
    # dropout and the spatial-input noise draw different numbers on each replica
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
        if isinstance(layer, SpatialInputNoise):
            layer.rate = layer.organ_dropout = layer.image_dropout = 0.0
    return model


rng = np.random.default_rng(0)
images = rng.uniform(-1, 1, (2, 1, 32, 32, 32, 1)).astype(np.float32)
labels = rng.integers(0, method.NUM_CLASSES, (2, 1, 32, 32, 32)).astype(np.uint8)

keras.utils.set_random_seed(0)
with strategy.scope():
    model = without_randomness(build_scn())
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)
    ema = [tf.Variable(v, trainable=False) for v in model.trainable_variables]
    iteration = tf.Variable(0, dtype=tf.int64)
    mean_norm = tf.Variable(0.0)
initial = [v.numpy() for v in model.trainable_variables]
step = make_train_step(model, optimizer, ema, iteration, mean_norm, True, 0.999, strategy)
per_replica = strategy.experimental_distribute_values_from_function(
    lambda context: (images[context.replica_id_in_sync_group],
                     labels[context.replica_id_in_sync_group]))
loss, norm = step(*per_replica)
trained = [v.numpy() for v in model.trainable_variables]
result["copies_equal"] = all(
    np.array_equal(v.value.values[0].numpy(), v.value.values[1].numpy())
    for v in model.trainable_variables)
result["iteration"] = int(iteration.numpy())
ema_expected = [0.1 * a + 0.9 * b for a, b in zip(initial, trained)]  # EMA decay 1/10 at step 0
result["ema_error"] = max(float(np.abs(e.numpy() - x).max()) for e, x in zip(ema, ema_expected))

# one device: the loss and gradient of each sample alone, then Adam on their mean
reference = without_randomness(build_scn())
for variable, value in zip(reference.trainable_variables, initial):
    variable.assign(value)
sample_losses, sample_gradients = [], []
for image, label in zip(images, labels):
    with tf.GradientTape() as tape:
        sample_loss = losses.scn_loss(reference(image, training=True),
                                      tf.one_hot(tf.cast(label, tf.int32), method.NUM_CLASSES))
        regularised = sample_loss + tf.add_n(reference.losses)  # the L2 weight decay
    sample_losses.append(float(sample_loss))
    sample_gradients.append(tape.gradient(regularised, reference.trainable_variables))
mean_gradients = [(a + b) / 2 for a, b in zip(*sample_gradients)]
result["loss"], result["loss_expected"] = float(loss), float(np.mean(sample_losses))
result["norm"] = float(norm)
result["norm_expected"] = float(tf.linalg.global_norm(mean_gradients))


def adam_error(gradients):
    """Share of the weights where the two-replica step and one Adam step with ``gradients`` differ
    by more than 1 % of the learning rate. (Adam's first step is about lr * sign(g); where g is
    near Adam's epsilon, float rounding in the reductions may flip it, so not the maximum.)"""
    for variable, value in zip(reference.trainable_variables, initial):
        variable.assign(value)
    keras.optimizers.Adam(1e-4).apply_gradients(zip(gradients, reference.trainable_variables))
    differ = sum(int((np.abs(v.numpy() - w) > 1e-6).sum())
                 for v, w in zip(reference.trainable_variables, trained))
    return differ / sum(w.size for w in trained)


result["weights_error"] = adam_error(mean_gradients)
result["weights_error_one_sample"] = adam_error(sample_gradients[0])
result["weights_change"] = max(float(np.abs(w - i).max()) for w, i in zip(trained, initial))

# the whole command over the two devices: tf.data samples, checkpoint, validation, export
main(["--stage", "segmentation", "--run", run_folder, "--generated", "2", "--generated-size",
      "64", "--validation", "1", "--crop-size", "32", "32", "32", "--iterations", "2",
      "--checkpoint-every", "2", "--validate-every", "2", "--workers", "1",
      "--devices", "/cpu:0", "/cpu:1", "--export", run_folder + "/weights"])
print("RESULT " + json.dumps(result))
'''


def test_two_replicas_train_as_one_device_on_the_mean_gradient(tmp_path):
    completed = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], cwd=ROOT,
                               capture_output=True, encoding="utf-8", errors="replace",
                               timeout=900, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                 "TF_CPP_MIN_LOG_LEVEL": "2"})
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["replicas"] == 2
    assert result["iteration"] == 1  # one step, not one per replica
    assert result["copies_equal"]
    assert abs(result["loss"] - result["loss_expected"]) < 1e-5 * result["loss_expected"]
    # averaged, not summed (which would double the norm; Adam alone would not tell)
    assert abs(result["norm"] - result["norm_expected"]) < 1e-4 * result["norm_expected"]
    assert result["weights_change"] > 5e-5  # Adam's first step moves weights by about lr
    assert result["weights_error"] < 1e-4, result
    assert result["weights_error_one_sample"] > 0.05, result  # both replicas' samples count
    assert result["ema_error"] < 1e-6

    run = tmp_path / "run"
    assert "2 replicas" in completed.stdout
    with open(run / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    # the starting weights' validation (iteration 0, no loss yet), then the trained one's
    assert [row["iteration"] for row in rows] == ["0", "2"]
    assert rows[0]["loss"] == "" and json.loads(rows[0]["validation"])
    assert json.loads(rows[1]["validation"])
    assert (run / "weights" / "segmentation.weights.h5").stat().st_size > 0
