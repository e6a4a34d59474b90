# syntax=docker/dockerfile:1
# One image for every moe-runtime service; a Deployment or compose service picks one by command:
#   python -m services.gateway | router | attention | expert | autoscaler
#
#   docker build -t moe-runtime:0.1.0 .                                 # CPU (default)
#   docker build --build-arg BASE=cuda -t moe-runtime:0.1.0-cuda .      # NVIDIA GPUs
#
# No model weights inside: the checkpoint is mounted read-only at run time (MOE_MODEL_DIR).
# Runs as uid 10001 with a read-only root filesystem; HOME and caches point at /tmp, which the
# chart and compose mount as an emptyDir/tmpfs.

ARG BASE=cpu
# 3.11: pyproject.toml pins requires-python to 3.11.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- bases: the same Python, differing in where torch comes from --------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
# The CPU wheel index: PyPI's default Linux torch wheel drags in gigabytes of CUDA libraries.
ENV MOE_TORCH_INDEX=https://download.pytorch.org/whl/cpu

# Not an nvidia/cuda image: those ship Ubuntu's Python (3.10/3.12, not 3.11), and torch's PyPI
# wheel carries its own CUDA runtime as nvidia-* wheels. The driver comes from the host through
# the NVIDIA container toolkit, which these two variables ask for.
FROM ${PYTHON_IMAGE} AS base-cuda
ENV MOE_TORCH_INDEX=https://pypi.org/simple \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# --- build: a virtualenv with torch, then the package ------------------------------------------
FROM base-${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned, from the base's index: `pip install .` would otherwise resolve torch==2.13.0
# from PyPI and take the CUDA build. Its own layer, so code changes do not re-download it.
RUN pip install --index-url "$MOE_TORCH_INDEX" torch==2.13.0
WORKDIR /src
COPY pyproject.toml ./
COPY model ./model
COPY protos ./protos
COPY services ./services
# Not editable: the runtime stage copies only the venv, never the source tree.
RUN pip install . && pip check

# --- runtime ------------------------------------------------------------------------------------
FROM base-${BASE} AS runtime
# A numeric user so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --gid 10001 moe \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin moe
COPY --from=build /opt/venv /opt/venv
# Everything a library may write goes under /tmp (the only writable mount); bytecode was compiled
# at install, so Python never tries to write next to the read-only sources.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.triton \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
USER 10001:10001
# gateway 50050, router 50051, attention 50052, expert 50053 (+ UCX 50054), metrics 9400.
EXPOSE 50050 50051 50052 50053 50054 9400
CMD ["moe", "--help"]
