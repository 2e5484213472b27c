# Inference image for the FLARE organisers' command (README, "The container"):
#   docker container run --gpus="device=0" --name TEAM --rm -v $PWD/inputs/:/workspace/inputs/ \
#     -v $PWD/outputs/:/workspace/outputs/ TEAM:latest /bin/bash -c "sh predict.sh"
# GPU image (the defaults):  docker build -t TEAM:latest .
# CPU image without a registry or Docker engine: container/build_and_check.sh (buildah, podman).
# Only predict.sh, app/ and weights/ (and the pinned requirements, deleted after use) are copied:
# .dockerignore keeps the rest of the repository out.

# Any base with python3 (3.11, like the pins) and its venv module; container/make_base.sh makes a
# Debian bookworm one where python:3.11-slim cannot be pulled.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# TensorFlow with its CUDA libraries from pip, so no CUDA base image is needed; a CPU-only image
# takes tensorflow-cpu==2.21.0. The other packages come from container/requirements-runtime.txt.
ARG TENSORFLOW="tensorflow[and-cuda]==2.21.0"

# A virtual environment first on PATH: `python3` in predict.sh finds the packages on any base, and
# a Debian base's own Python (externally managed, PEP 668) is left as it is.
ENV VIRTUAL_ENV=/opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY container/requirements-runtime.txt container/constraints-cuda.txt /tmp/requirements/
# Behind a TLS-intercepting proxy pip needs the proxy's certificate authority: a build secret
# `pip_cert` (a CA bundle file; build --secret id=pip_cert,src=FILE) is used for this step only
# and never stored in the image. Without it pip trusts its own bundle.
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir --disable-pip-version-check \
        --constraint /tmp/requirements/constraints-cuda.txt \
        --requirement /tmp/requirements/requirements-runtime.txt \
        "${TENSORFLOW}" \
    && pip check \
    && rm -rf /tmp/requirements

# GPU memory: TF_FORCE_GPU_ALLOW_GROWTH stops TensorFlow from taking almost all GPU memory at
# start; with cuda_malloc_async TensorFlow allocates through CUDA's stream-ordered pool instead of
# its BFC arena, which grows in large chunks and never gives memory back, so the memory the
# organisers sample (nvidia-smi) stays near what the networks use. NVIDIA_DRIVER_CAPABILITIES
# asks the NVIDIA container toolkit for the CUDA (compute) and NVML (utility) libraries only;
# `--gpus` chooses the device. TF_CPP_MIN_LOG_LEVEL=2 keeps TensorFlow's start-up chatter off
# the log. Python output is unbuffered so the progress lines reach the log as cases finish.
ENV TF_FORCE_GPU_ALLOW_GROWTH=true \
    TF_GPU_ALLOCATOR=cuda_malloc_async \
    TF_CPP_MIN_LOG_LEVEL=2 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /workspace
COPY predict.sh ./
COPY app/ app/
COPY weights/ weights/
# Byte-code compiled now, so that no run starts by compiling (nor writes into the container).
RUN python3 -m compileall -q app

CMD ["sh", "predict.sh"]
