"""Model release: writing weights folders (training snapshots, averages, the published weights'
import, the weights-file layout), scoring candidates and the shipping rules that decide which
weights ship (weights/MODEL_CARD.md)."""

import app  # noqa: F401  (app/ sets TensorFlow's CPU kernels before anything imports TensorFlow)
