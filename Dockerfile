# syntax=docker/dockerfile:1
#
# streamkd daemon image: Python, torch + torchvision at the versions CI tests (constraints.txt),
# the streamkd package with its export extra (ONNX), and tini as PID 1.
#
#   docker build -t streamkd:local .                                   # CUDA (torch's PyPI build)
#   docker build --build-arg TORCH_VARIANT=cpu -t streamkd:cpu .       # CPU only: no CUDA libraries
#   make image / make image-cpu                                        # the same, with the git revision as a label
#   docker run --gpus all -p 9400:9400 -v streamkd-state:/var/lib/streamkd \
#     -e STREAMKD_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 streamkd:local
#
# Configuration: /etc/streamkd/config.yaml (deploy/container/config.yaml) holds the container's
# settings; mount your own file there to replace it. No STREAMKD_* variable is set here, so every
# key of a mounted file takes effect. Needs BuildKit (the default builder since Docker 23).

# The Python base; pass PYTHON_IMAGE=python:3.12-slim-bookworm@sha256:... to pin its digest.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# tini as PID 1: the upstream static binary, pinned by checksum per architecture,
# so it does not depend on the base image's distribution or its package versions.
FROM scratch AS tini
ADD --checksum=sha256:c5b0666b4cb676901f90dfcb37106783c5fe2077b04590973b885950611b30ee --chmod=0755 \
    https://github.com/krallin/tini/releases/download/v0.19.0/tini-static-amd64 /tini-amd64
ADD --checksum=sha256:eae1d3aa50c48fb23b8cbdf4e369d0910dfc538566bfd09df89a774aa84a48b9 --chmod=0755 \
    https://github.com/krallin/tini/releases/download/v0.19.0/tini-static-arm64 /tini-arm64

FROM ${PYTHON_IMAGE}

# cuda: torch and torchvision from PyPI, whose Linux x86_64 build carries the CUDA libraries as
# wheels (the host needs only the NVIDIA driver and Container Toolkit). cpu: PyTorch's CPU-only
# index, without any CUDA library.
ARG TORCH_VARIANT=cuda
# OCI annotations: `make image` passes the version from pyproject.toml, the git revision and the
# repository's remote URL.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown

LABEL org.opencontainers.image.title="streamkd" \
      org.opencontainers.image.description="Online knowledge distillation daemon: Kafka images -> teacher -> student snapshots" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      io.streamkd.torch-variant="${TORCH_VARIANT}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Process settings only; the daemon's settings live in /etc/streamkd/config.yaml.
# Caches (torch hub weights, Triton kernels with train.compile, datasets) live on the state
# volume: the root filesystem may be read-only (the Kubernetes manifests make it so).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TORCH_HOME=/var/lib/streamkd/cache/torch \
    TRITON_CACHE_DIR=/var/lib/streamkd/cache/triton \
    XDG_CACHE_HOME=/var/lib/streamkd/cache

# TARGETARCH is set by BuildKit from the target platform (amd64 or arm64).
ARG TARGETARCH
COPY --from=tini /tini-${TARGETARCH} /usr/bin/tini

RUN groupadd --gid 10001 streamkd \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/streamkd \
        --shell /usr/sbin/nologin streamkd \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/streamkd /var/lib/streamkd/checkpoints \
        /var/lib/streamkd/snapshots /var/lib/streamkd/cache \
    && install -d -m 0755 /etc/streamkd /opt/streamkd

WORKDIR /opt/streamkd/src

# torch and torchvision first, at the versions of constraints.txt (what the test suite runs with):
# the largest layer, rebuilt only when the pins or the variant change.
COPY constraints.txt ./
RUN case "${TORCH_VARIANT}" in \
        cuda) index=https://pypi.org/simple ;; \
        cpu) index=https://download.pytorch.org/whl/cpu ;; \
        *) echo "TORCH_VARIANT must be cuda or cpu, got ${TORCH_VARIANT}" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir --index-url "${index}" --constraint constraints.txt torch torchvision \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The other dependencies, from pyproject.toml alone (the package directory is not there yet, so
# this builds an empty distribution): rebuilt only when pyproject.toml changes. The export extra
# (onnx, onnxruntime) is in; the development broker is not.
COPY pyproject.toml ./
RUN pip install --no-cache-dir --constraint constraints.txt ".[export]" \
    && pip uninstall --yes streamkd

# The package itself; its dependencies are already installed.
COPY README.md LICENSE ./
COPY streamkd/ streamkd/
RUN pip install --no-cache-dir --no-deps --constraint constraints.txt . \
    && streamkd --help > /dev/null

COPY deploy/container/config.yaml /etc/streamkd/config.yaml

USER 10001:10001
WORKDIR /var/lib/streamkd
VOLUME ["/var/lib/streamkd"]
EXPOSE 9400

# /healthz answers 200 while the main loop is alive. The port (and address) come from the same
# config resolution as the daemon's: the file at /etc/streamkd/config.yaml < STREAMKD_* variables.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; from streamkd.config import load_config; m = load_config(sys.argv[1]).metrics; host = '127.0.0.1' if m.host in ('0.0.0.0', '::', '') else m.host; sys.exit(urllib.request.urlopen(f'http://{host}:{m.port}/healthz', timeout=4).status != 200)", "/etc/streamkd/config.yaml"]

# tini forwards SIGTERM to the daemon, which finishes its batch, checkpoints, publishes a
# snapshot, commits offsets and exits 0 within train.shutdown_grace_s (give `docker stop`
# a longer timeout than that: compose uses stop_grace_period: 60s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "streamkd"]
CMD ["run", "-c", "/etc/streamkd/config.yaml"]
