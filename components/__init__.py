"""Kubeflow Pipelines v2 components: one per stage, each a thin wrapper over one `deepsc` function.

Only a component function's source travels to the cluster, so every import happens inside the
function body; the functions run in the project's container image (Dockerfile), which has the
locked dependencies and the `deepsc` package installed.
"""

import os

IMAGE = os.environ.get("DEEPSC_IMAGE", "ghcr.io/deepsc/deepsc:0.1.0")
"""Container image of the CPU steps (override with DEEPSC_IMAGE when compiling)."""

GPU_IMAGE = os.environ.get("DEEPSC_GPU_IMAGE", "ghcr.io/deepsc/deepsc:0.1.0-cu128")
"""Container image of the GPU steps (training, evaluation): the CUDA build of the Dockerfile.
The CPU image would run them on the CPU while holding the GPU (override with DEEPSC_GPU_IMAGE)."""
