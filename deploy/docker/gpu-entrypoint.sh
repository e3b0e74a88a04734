#!/bin/sh
# Entrypoint of the gpu image: make sure the served model has TensorRT plans for this GPU, then serve.
#
# Plans only load on the GPU family and TensorRT release that built them, so they cannot ship in the image.
# `clipserve build-engines` looks for a build matching this GPU in the model's manifest and, when there is none,
# builds one (minutes, once) into the model directory on the mounted volume and records it in the manifest;
# later starts, and other replicas sharing the volume, find it and start in seconds. With another engine
# (CLIPSERVE_ENGINE=onnxruntime) there is nothing to build.
set -eu

if [ "${CLIPSERVE_ENGINE:-tensorrt}" = "tensorrt" ]; then
    clipserve build-engines
fi
exec "$@"
