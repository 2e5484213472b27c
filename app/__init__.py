"""What the container runs: ``python -m app`` (predict.sh) and the Predictor."""

import os

# TensorFlow enables its oneDNN CPU kernels by default only on CPUs with AVX-512 and newer vector
# extensions. On an AVX2-only CPU (2-core AMD EPYC Zen 3) they made the SCN 1.4-1.7x faster, the
# localization net 1.4-1.5x and training steps 2.5-3x (docs/speed.md), for +350 MB of peak memory,
# and the labels of three CTs matched but for 1 voxel. Set before TensorFlow is imported (every
# package here imports app/ first); TF_ENABLE_ONEDNN_OPTS=0 in the environment turns them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
