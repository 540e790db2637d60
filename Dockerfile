# cputune + a llama.cpp build tuned for one CPU family, built on any x86-64 box.
#   docker build --build-arg TARGET_CPU=znver5 -t cputune .
#   docker run --rm --privileged -p 8080:8080 -v /srv/models:/models -e CPUTUNE_QUANT=q8_0 cputune
# The RUN steps are the README's steps (scripts/setup.sh, `cputune build`), so CI exercises them.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TARGET_CPU=znver4
ENV XDG_CACHE_HOME=/opt/cache DEBIAN_FRONTEND=noninteractive
WORKDIR /opt/cputune
COPY . .
RUN scripts/setup.sh
RUN .venv/bin/cputune build --target-cpu ${TARGET_CPU} --python --json > /opt/cache/build.json

FROM ${PYTHON_IMAGE} AS final
ARG TARGET_CPU=znver4
RUN apt-get update && apt-get install -y --no-install-recommends numactl libgomp1 libnuma1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/cputune /opt/cputune
COPY --from=build /opt/cache/cputune/builds /opt/cache/cputune/builds
COPY --from=build /opt/cache/build.json /opt/cache/build.json
ENV PATH=/opt/cputune/.venv/bin:$PATH XDG_CACHE_HOME=/opt/cache CPUTUNE_TARGET_CPU=${TARGET_CPU} \
    CPUTUNE_MODELS_DIR=/models
VOLUME /models
WORKDIR /models
EXPOSE 8080
# Serves the CPUTUNE_QUANT file of /models (CPUTUNE_MODEL picks among several), placed on the
# host's NUMA nodes (numactl needs --privileged or --cap-add SYS_NICE). 0.0.0.0 so -p reaches it.
CMD ["cputune", "serve", "--host", "0.0.0.0", "--port", "8080"]
