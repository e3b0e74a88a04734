# clipserve images, two targets (deploy/README.md has the whole story):
#
#   docker build --target cpu -t clipserve:cpu .   slim Python, ONNX Runtime on the CPU, no torch
#   docker build --target gpu -t clipserve:gpu .   NVIDIA CUDA runtime, onnxruntime-gpu, TensorRT, cuda-bindings,
#                                                  the CUDA similarity kernel
#
# Both run as the non-root user clipserve (uid 10001, numeric so that Kubernetes' runAsNonRoot can check it),
# listen on 0.0.0.0:8000 and serve the model repository at /models, which holds the built-in demo model until a
# volume is mounted there, so `docker run -p 8000:8000 clipserve:cpu` answers at once. Each target installs its
# dependencies from pyproject.toml alone before any source is copied, and the project itself into a small layer
# of its own: a code change rebuilds seconds of work.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# CUDA 13 with cuDNN 9: what onnxruntime-gpu's PyPI wheels (1.27 and later) and tensorrt-cu13 are built against.
# 13.0, the first CUDA 13 release, so that every CUDA 13 driver (580 and newer) passes the NVIDIA runtime's check.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# The same CUDA release with its compiler, only to build the similarity kernel's fatbin.
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04

# ---------------------------------------------------------------------------------------------------- cpu ----
FROM ${PYTHON_IMAGE} AS cpu-deps
WORKDIR /src
COPY deploy/docker/install.sh pyproject.toml ./
RUN ./install.sh deps cpu

FROM cpu-deps AS cpu-app
COPY README.md ./
COPY models models
COPY export export
COPY service service
RUN ./install.sh app

FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 clipserve \
    && useradd --system --uid 10001 --gid clipserve --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin clipserve \
    && install -d -o clipserve -g clipserve /var/lib/clipserve
COPY --from=cpu-deps /opt/clipserve /opt/clipserve
COPY --from=cpu-app /install/ /opt/clipserve/
COPY --chown=clipserve:clipserve models/demo/repository/ /models/
ENV PATH=/opt/clipserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CLIPSERVE_HOST=0.0.0.0 \
    CLIPSERVE_PORT=8000 \
    CLIPSERVE_MODEL_REPOSITORY=/models \
    CLIPSERVE_STATE_DIR=/var/lib/clipserve \
    CLIPSERVE_PLAYGROUND=false \
    CLIPSERVE_ENGINE=onnxruntime
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# /healthz answers once the model is loaded and warm (uvicorn accepts connections only after startup).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["python3", "-m", "service.healthcheck"]
CMD ["clipserve", "serve"]

# ---------------------------------------------------------------------------------------------------- gpu ----
FROM ${CUDA_IMAGE} AS gpu-base
# Ubuntu 24.04's Python 3.12; the venv keeps pip away from the system interpreter (PEP 668). Its version follows
# the base image's Ubuntu release: pinning a patch version would break every rebuild after a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 clipserve \
    && useradd --system --uid 10001 --gid clipserve --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin clipserve \
    && install -d -o clipserve -g clipserve /var/lib/clipserve

FROM gpu-base AS gpu-deps
WORKDIR /src
COPY deploy/docker/install.sh pyproject.toml ./
RUN ./install.sh deps gpu

# The CUDA similarity kernel: nvcc compiles it ahead of time into a fatbin for every supported GPU family (plus
# PTX for newer ones), so the serving image needs neither the compiler nor a GPU at build time.
FROM ${CUDA_DEVEL_IMAGE} AS gpu-kernels
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY service/__init__.py service/__init__.py
COPY service/kernels service/kernels
RUN python3 -m service.kernels.build

FROM gpu-deps AS gpu-app
COPY README.md ./
COPY models models
COPY export export
COPY service service
# Before the install, so the package (service/kernels/*.fatbin is package data) carries it.
COPY --from=gpu-kernels /src/service/kernels/similarity.fatbin service/kernels/similarity.fatbin
RUN ./install.sh app

FROM gpu-base AS gpu
COPY --from=gpu-deps /opt/clipserve /opt/clipserve
COPY --from=gpu-app /install/ /opt/clipserve/
COPY --chown=clipserve:clipserve models/demo/repository/ /models/
COPY deploy/docker/gpu-entrypoint.sh /usr/local/bin/clipserve-gpu-entrypoint
# TensorRT's wheels keep libnvinfer inside site-packages; ONNX Runtime's TensorRT provider (CLIPSERVE_ENGINE=
# onnxruntime on this image) finds it only on the loader path.
ENV PATH=/opt/clipserve/bin:$PATH \
    LD_LIBRARY_PATH=/opt/clipserve/lib/python3.12/site-packages/tensorrt_libs \
    PYTHONUNBUFFERED=1 \
    CLIPSERVE_HOST=0.0.0.0 \
    CLIPSERVE_PORT=8000 \
    CLIPSERVE_MODEL_REPOSITORY=/models \
    CLIPSERVE_STATE_DIR=/var/lib/clipserve \
    CLIPSERVE_PLAYGROUND=false \
    CLIPSERVE_ENGINE=tensorrt
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# TensorRT plans are specific to a GPU family and TensorRT release: the entrypoint builds them for the GPU it
# finds when /models has none (minutes, once), writes them next to the model, then serves.
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=20m --retries=3 CMD ["python3", "-m", "service.healthcheck"]
ENTRYPOINT ["clipserve-gpu-entrypoint"]
CMD ["clipserve", "serve"]
