# syntax=docker/dockerfile:1
# One image for every Trainyard process: the web app, the GPU workers, the reconciler, the migrate step, the
# MLflow tracking server and Flower. docker-compose.yml and deploy/kubernetes/ choose the command.
#
# Base and torch: python:3.11-slim plus PyTorch's CUDA wheels, not a pytorch/pytorch:<tag> image.
# pyproject.toml pins torch==2.14.1 and torchvision==0.29.1 exactly (those builds are on the development and
# CI machines' disk, and they are what the test suite runs against) and requires Python 3.11. A
# pytorch/pytorch image ships its own torch and Python: pip would either replace its torch with the pinned
# one (a second multi-GB copy) or we would have to drop the pins and ship a torch the tests never ran. The
# wheels from PyTorch's CUDA index carry CUDA and cuDNN as pip packages, so the image needs only the NVIDIA
# driver and container toolkit on the host. cu130 (the build the machines have, 2.14.1+cu130) needs driver
# >= 580; for an older driver build with a CUDA 12 index, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# (tests/test_deploy.py checks TORCH_VERSION and TORCHVISION_VERSION against pyproject.toml.)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRAINYARD_DATA_DIR=/data \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# CUDA_DEVICE_ORDER: CUDA numbers GPUs as NVML does (the pool pins workers by NVML's index).
# NVIDIA_DRIVER_CAPABILITIES: the container toolkit mounts the driver's compute (CUDA) and utility (NVML) parts.

WORKDIR /app

# torch first, from the CUDA index: the largest layer, rebuilt only when the pins change.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The other dependencies, from pyproject.toml alone, so editing code does not reinstall them. The pinned
# torch above already satisfies `torch==2.14.1` (PEP 440 ignores the +cu130 local label).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY platform platform
COPY workers workers
COPY web web
COPY migrations migrations
COPY deploy deploy
# Editable: trainyard.db finds migrations/ beside platform/ (see MIGRATIONS_DIR), as in a checkout.
RUN pip install --no-deps -e . \
    && pip check \
    && python -c "import torch, torchvision, trainyard, trainyard_workers, trainyard_web, flower"

# Not root. /data (datasets, checkpoints, admin token) and /mlartifacts (the MLflow server's artifacts) are
# created here so the named volumes mounted there start out owned by this user.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin trainyard \
    && mkdir -p /data /mlartifacts \
    && chown trainyard:trainyard /data /mlartifacts
USER trainyard

EXPOSE 8000
# The default command is the web app; every other service (workers, MLflow, Flower, ...) sets its own
# command and its own health check in docker-compose.yml or its Kubernetes probes.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["python", "/app/deploy/healthcheck.py", "http", "http://127.0.0.1:8000/api/v1/health"]
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "4", "--access-logfile", "-", \
     "trainyard_web:create_app()"]
