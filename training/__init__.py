"""Training of both networks (imports from app/, never the other way round)."""

import app  # noqa: F401  (app/ sets TensorFlow's CPU kernels before anything imports TensorFlow)
