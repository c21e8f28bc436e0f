# qwrap with CUDA: llama.cpp built for common GPU architectures (no -march=native), the
# converter and backend environments pre-built. The image only calls the Makefile targets
# that CI runs, so what is tested is what ships.
#
#   docker build -t qwrap .
#   docker run --gpus all -v hf-cache:/data/hf-cache -v "$PWD/out:/data/out" -e HF_TOKEN \
#     qwrap run org/name --format gguf -q Q4_K_M -o /data/out
ARG CUDA_VERSION=12.6.3
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    QWRAP_CACHE_DIR=/opt/qwrap/cache \
    PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
      cmake ninja-build ccache git ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/qwrap/src
COPY . .
# Portable CUDA build: Volta..Hopper, no host-specific CPU flags.
RUN make venv llama LLAMA_CUDA=1 LLAMA_NATIVE=0 LLAMA_CUDA_ARCHS="70;75;80;86;89;90" \
 && make envs backend-envs \
 && rm -rf "$QWRAP_CACHE_DIR/ccache" "$QWRAP_CACHE_DIR/downloads"

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
ENV DEBIAN_FRONTEND=noninteractive \
    QWRAP_CACHE_DIR=/opt/qwrap/cache \
    HF_HOME=/data/hf-cache \
    PATH=/opt/qwrap/src/.venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 qwrap \
 && mkdir -p /data/hf-cache /data/out \
 && chown qwrap:qwrap /data/hf-cache /data/out
# Same paths as the build stage: virtual environments are not relocatable.
COPY --from=build --chown=qwrap:qwrap /opt/qwrap /opt/qwrap
USER qwrap
WORKDIR /data/out
VOLUME ["/data/hf-cache", "/data/out"]
ENTRYPOINT ["qwrap"]
CMD ["--help"]
