# syntax=docker/dockerfile:1
# The deepsc runtime image: the `deepsc` CLI (every pipeline stage, Kubeflow components,
# PyTorchJob training) and `mlflow models serve` for the registry's champion.
#
#   CPU (default):  docker build -t deepsc:0.1.0 .
#   GPU nodes:      docker build -t deepsc:0.1.0-cu128 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# Install order is the one the Makefile uses: torch==2.13.0 first (from the chosen wheel index),
# then the lock file under constraints.txt (which pins that torch), then the package itself
# without dependencies, so the image holds exactly the tested versions.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN pip install --upgrade pip \
 && pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY requirements.lock constraints.txt ./
RUN pip install -r requirements.lock -c constraints.txt
COPY pyproject.toml README.md ./
COPY deepsc ./deepsc
RUN pip install --no-deps . \
 && python -c "import torch, deepsc; assert torch.__version__.startswith('2.13.0'), torch.__version__"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="deepsc" \
      org.opencontainers.image.description="DeepSC-COVID: joint 3D lesion segmentation and explainable COVID-19 classification from chest CT" \
      org.opencontainers.image.licenses="Apache-2.0"
# git: DVC works inside a git checkout (CI, `dvc pull` in a workspace).
RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 deepsc \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin deepsc
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The settings the image was built with; jobs pass --params /app/params.yaml (and --profile).
COPY params.yaml ./
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DVC_NO_ANALYTICS=1 \
    MPLBACKEND=Agg
# Numeric user, so Kubernetes can verify runAsNonRoot.
USER 10001:10001
ENTRYPOINT ["deepsc"]
CMD ["--help"]
