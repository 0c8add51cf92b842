# syntax=docker/dockerfile:1
# jwt-sidecar: a small, non-root image that works with a read-only root filesystem.
#   docker build -t jwt-sidecar .
#   docker run --read-only -v $PWD/config.yaml:/etc/jwt-sidecar/config.yaml:ro -p 8080:8080 -p 9901:9901 jwt-sidecar

# --- build: a wheel of this project and of every dependency (uvloop included) -----------
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: only the installed wheels; no compiler, no pip cache, no source tree ---------
FROM python:3.11-slim
# No .pyc written at run time (the root filesystem is read-only); logs unbuffered.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl \
 && groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sidecar
# A fixed numeric UID, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER 10001:10001
# 8080: proxied traffic; 9901: /healthz /readyz /metrics
EXPOSE 8080 9901
ENTRYPOINT ["jwt-sidecar", "run", "--config", "/etc/jwt-sidecar/config.yaml"]
