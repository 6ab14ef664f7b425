# tserve: a slim serving image (no torch, no compilers), non-root, with the shipped models.
#
#   podman build --format docker -t tserve .                        # CPU (docker format keeps HEALTHCHECK)
#   podman build -t tserve-gpu --build-arg BASE_IMAGE=<a CUDA 12 + cuDNN 9 runtime image with python3.11> \
#       --build-arg ORT_PACKAGE=onnxruntime-gpu==1.23.2 .            # then run with TSERVE_EXECUTION_PROVIDER=cuda
#
# Other models: mount a Triton-layout repository at /models (or set TSERVE_MODEL_REPOSITORY).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG ORT_PACKAGE=onnxruntime
# a CA bundle for pip where TLS is intercepted (mount it into the build, pass its path)
ARG PIP_CERT=
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
RUN python3 -m venv /opt/tserve \
 && /opt/tserve/bin/pip install --no-cache-dir ${PIP_CERT:+--cert "$PIP_CERT"} . \
 && if [ "${ORT_PACKAGE}" != "onnxruntime" ]; then \
      /opt/tserve/bin/pip uninstall -y onnxruntime \
      && /opt/tserve/bin/pip install --no-cache-dir ${PIP_CERT:+--cert "$PIP_CERT"} "${ORT_PACKAGE}"; \
    fi

FROM ${BASE_IMAGE} AS runtime
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tserve \
 && install -d -o 10001 -g 10001 /var/cache/tserve
COPY --from=build /opt/tserve /opt/tserve
COPY model_repository/ /models/
ENV PATH=/opt/tserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TSERVE_MODEL_REPOSITORY=/models \
    TSERVE_HOST=0.0.0.0 \
    TSERVE_HTTP_PORT=8000 \
    TSERVE_GRPC_PORT=8001 \
    TSERVE_METRICS_PORT=8002 \
    TSERVE_LOG_FORMAT=json \
    TSERVE_CACHE_DIR=/var/cache/tserve
# /var/cache/tserve: the fused generation graphs derived from Optimum exports (a volume keeps
# them across restarts; without one they are derived again at each start)
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["python3", "-m", "service.healthcheck"]
# SIGTERM drains: NOT_SERVING, new requests refused, in-flight ones finish within TSERVE_DRAIN_GRACE_SECONDS
STOPSIGNAL SIGTERM
ENTRYPOINT ["tserve", "serve"]
