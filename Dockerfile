# Inference image for the FLARE organisers' command:
#   docker container run --gpus="device=0" --name TEAM --rm -v $PWD/inputs/:/workspace/inputs/ \
#     -v $PWD/outputs/:/workspace/outputs/ TEAM:latest /bin/bash -c "sh predict.sh"
# Minimal for now; the container issue completes it (GPU TensorFlow, build and run scripts).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TENSORFLOW=tensorflow-cpu==2.21.0
WORKDIR /workspace
COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir --constraint /tmp/constraints.txt \
        "${TENSORFLOW}" keras numpy SimpleITK h5py tqdm \
    && rm /tmp/constraints.txt
ENV TF_CPP_MIN_LOG_LEVEL=2 TF_FORCE_GPU_ALLOW_GROWTH=true
COPY predict.sh ./
COPY app/ app/
COPY weights/ weights/
