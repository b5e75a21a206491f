# syntax=docker/dockerfile:1
# realtime-gateway container image: pip-built virtualenv on python:3.11 slim (Debian trixie).
#
#   docker build -t realtime-gateway .
#   docker run --rm -p 8080:8080 -p 9090:9090 -e OPENAI_API_KEY \
#     -v "$PWD/config/example.yaml:/etc/realtime-gateway/config.yaml:ro" realtime-gateway
#
# Runs as uid/gid 10001 and works with a read-only root filesystem (bytecode is compiled at
# build time; mount an emptyDir or tmpfs at /tmp). Kubernetes ignores HEALTHCHECK: the Helm
# chart (charts/realtime-gateway) probes /healthz and /readyz itself.
# Both stages use the same base image, so the virtualenv's interpreter path stays valid.

FROM python:3.11.14-slim-trixie AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# A virtualenv without pip: the final image gets the gateway and its dependencies only.
RUN python -m venv --without-pip /opt/venv
# A C compiler for the gateway's own extension (gateway/_framescan.c, the relay's frame
# scan) in this stage only; Debian's stable gcc of the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
# Only binary wheels for the dependencies (uvloop, httptools, cryptography, pydantic-core...);
# the build fails if the frame scan did not compile (the relay would fall back to Python).
RUN pip --python /opt/venv/bin/python install --no-cache-dir --only-binary=:all: . \
    && /opt/venv/bin/python -c "import gateway.config, gateway._framescan"

FROM python:3.11.14-slim-trixie AS runtime
LABEL org.opencontainers.image.title="realtime-gateway" \
      org.opencontainers.image.description="Multi-tenant WebSocket gateway for the OpenAI Realtime API" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMETHEUS_DISABLE_CREATED_SERIES=True \
    REALTIME_GATEWAY_CONFIG=/etc/realtime-gateway/config.yaml
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
# 8080: WebSocket endpoints, /healthz, /readyz. 9090: /metrics (keep it private).
EXPOSE 8080 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# Exec form: the gateway is PID 1 and gets SIGTERM directly (it drains, then exits).
ENTRYPOINT ["realtime-gateway"]
CMD ["serve"]
