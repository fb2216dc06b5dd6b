# syntax=docker/dockerfile:1
#
# Hearth: one image for the API and the workers.
#
#   docker build -t hearth .                      # CPU torch (the default)
#   docker build -t hearth-cuda \
#     --build-arg TORCH_INDEX_URL=https://pypi.org/simple .   # CUDA torch (CUDA 13 build)
#
#   docker run -p 8000:8000 -e REDIS_URL=redis://HOST:6379/0 hearth         # the API
#   docker run --gpus all -e REDIS_URL=redis://HOST:6379/0 hearth-cuda hearth worker
#
# The CUDA torch wheels carry their own CUDA libraries; the host only needs the
# NVIDIA driver and the NVIDIA Container Toolkit, so the slim Python base serves
# GPUs too. TORCH_INDEX_URL picks the wheels: https://download.pytorch.org/whl/cpu
# (CPU), https://pypi.org/simple (PyPI's Linux torch, built for CUDA 13), or
# https://download.pytorch.org/whl/cuXXX for another CUDA version that PyTorch
# publishes torch ${TORCH_VERSION} for. BASE_IMAGE swaps the base (a mirror, a
# digest-pinned image, a CUDA image): it must be Debian-based with Python 3.11 at
# /usr/local/bin/python, as the official python images are, because both stages
# use it and the venv points at that interpreter.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- builder ----
FROM ${BASE_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch goes in first and on its own, from the chosen index: resolved as a plain
# dependency of Hearth it would be PyPI's multi-GB CUDA build (see the Makefile).
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY hearth ./hearth
COPY app ./app
COPY workers ./workers
COPY models ./models
# A regular (non-editable) install: the runtime stage gets /opt/venv alone.
# The torch installed above satisfies Hearth's torch requirement and stays.
RUN pip install --no-cache-dir . \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---------------------------------------------------------------- runtime ----
FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="hearth" \
      org.opencontainers.image.description="Hearth: text embeddings and generated images over HTTP, jobs queued in Redis"

# Model store and state on one volume; no model hub is ever asked for anything.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/hearth \
    HEARTH_STATE_DIR=/data \
    HEARTH_MODELS_DIR=/data/models

# A fixed numeric user, so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 hearth \
    && useradd --system --uid 10001 --gid hearth --home-dir /home/hearth --create-home \
       --shell /usr/sbin/nologin hearth \
    && mkdir -p /data/models \
    && chown -R hearth:hearth /data

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/hearth

VOLUME ["/data"]
EXPOSE 8000

# The API's liveness. A worker serves no HTTP: run it with this check disabled
# (compose: `healthcheck: {disable: true}`; Kubernetes ignores HEALTHCHECK).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# The worker: `hearth worker` (same image, another command).
CMD ["hearth", "api", "--host", "0.0.0.0", "--port", "8000"]
