# syntax=docker/dockerfile:1
#
# streamkd daemon image: the base image's CUDA build of torch + the streamkd package.
#
#   docker build -t streamkd:local .
#   docker run --gpus all -p 9400:9400 -v streamkd-state:/var/lib/streamkd \
#     -e STREAMKD_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 streamkd:local
#
# Needs BuildKit (the default builder since Docker 23; `docker compose build` uses it).

# tini as PID 1: the upstream static binary, pinned by checksum per architecture,
# so it does not depend on the base image's distribution or its package versions.
FROM scratch AS tini
ADD --checksum=sha256:c5b0666b4cb676901f90dfcb37106783c5fe2077b04590973b885950611b30ee --chmod=0755 \
    https://github.com/krallin/tini/releases/download/v0.19.0/tini-static-amd64 /tini-amd64
ADD --checksum=sha256:eae1d3aa50c48fb23b8cbdf4e369d0910dfc538566bfd09df89a774aa84a48b9 --chmod=0755 \
    https://github.com/krallin/tini/releases/download/v0.19.0/tini-static-arm64 /tini-arm64

# The runtime flavour (no compiler, no CUDA toolkit): torch, torchvision, CUDA and cuDNN
# libraries come from here. Pinned by digest; the tag is kept for readers.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime@sha256:7b324d212a4450795b49edba9949b7cdc72429148a64e974334bfe5774d51385

LABEL org.opencontainers.image.title="streamkd" \
      org.opencontainers.image.description="Online knowledge distillation daemon: Kafka images -> GPU teacher -> student snapshots" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Container defaults; the config file and STREAMKD_* variables of the run override them.
# Caches (torch hub weights, Triton kernels with train.compile, datasets) live on the state
# volume: the root filesystem may be read-only (the Kubernetes manifests make it so).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    STREAMKD_METRICS__HOST=0.0.0.0 \
    STREAMKD_LOGGING__FORMAT=json \
    STREAMKD_CHECKPOINT__DIR=/var/lib/streamkd/checkpoints \
    STREAMKD_SNAPSHOT__DIR=/var/lib/streamkd/snapshots \
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

# Keep the base image's CUDA torch: pip installs below are constrained to the torch and
# torchvision versions already installed, so pip fails instead of pulling another torch from
# PyPI. (Images built FROM this one: pass `--constraint /opt/streamkd/base-constraints.txt`.)
RUN python -c "import importlib.metadata as m; print(*(f'{d}=={m.version(d)}' for d in ('torch', 'torchvision')), sep='\n')" \
        > /opt/streamkd/base-constraints.txt \
    && cat /opt/streamkd/base-constraints.txt

WORKDIR /opt/streamkd/src

# Dependencies first, from pyproject.toml alone (the package directory is not there yet, so
# this builds an empty distribution): this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN pip install --no-cache-dir --constraint /opt/streamkd/base-constraints.txt ".[broker]" \
    && pip uninstall --yes streamkd

# The package itself; its dependencies are already installed.
COPY README.md ./
COPY streamkd/ streamkd/
RUN pip install --no-cache-dir --no-deps --constraint /opt/streamkd/base-constraints.txt . \
    && streamkd --help > /dev/null

COPY config.yaml /etc/streamkd/config.yaml

USER 10001:10001
WORKDIR /var/lib/streamkd
VOLUME ["/var/lib/streamkd"]
EXPOSE 9400

# /healthz answers 200 while the main loop is alive. python instead of curl: the base has it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('STREAMKD_METRICS__PORT', '9400'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

# tini forwards SIGTERM to the daemon, which finishes its batch, checkpoints, publishes a
# snapshot, commits offsets and exits 0 within train.shutdown_grace_s (give `docker stop`
# a longer timeout than that: compose uses stop_grace_period: 60s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "streamkd"]
CMD ["run", "-c", "/etc/streamkd/config.yaml"]
