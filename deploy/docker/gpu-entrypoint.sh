#!/bin/sh
# Entrypoint of the gpu image: make sure the served model has TensorRT plans for this GPU, then serve.
#
# Plans only load on the GPU family and TensorRT release that built them, so they cannot ship in the image.
# `clipserve build-engines` looks for a build matching this GPU in the model's manifest and, when there is none,
# builds one (minutes, once) into the model directory on the mounted volume and records it in the manifest;
# later starts, and other replicas sharing the volume, find it and start in seconds. Only `clipserve serve` with
# CLIPSERVE_ENGINE=tensorrt needs plans; any other command (a shell, `clipserve export`) runs at once. As in the
# service's settings, an empty CLIPSERVE_ENGINE means unset, which is onnxruntime.
set -eu

build_plans() {
    # In the background, so that this shell (PID 1) can pass on a SIGTERM from `docker stop` or the kubelet
    # instead of ignoring it until the build ends.
    clipserve build-engines &
    builder=$!
    trap 'kill -TERM "$builder" 2>/dev/null' TERM INT
    status=0
    wait "$builder" || status=$?
    if kill -0 "$builder" 2>/dev/null; then  # woken by the trap: wait for the builder to exit
        status=0
        wait "$builder" || status=$?
    fi
    trap - TERM INT
    return "$status"
}

if [ "${1:-}" = "clipserve" ] && [ "${2:-}" = "serve" ] && [ "${CLIPSERVE_ENGINE:-onnxruntime}" = "tensorrt" ]; then
    build_plans
fi
exec "$@"
