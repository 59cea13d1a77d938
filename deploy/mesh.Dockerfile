# syntax=docker/dockerfile:1
# One image for every role of the mesh (router, gateway, worker, compressor, demo); compose picks the
# command. CPU torch by default; for CUDA hosts build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (TORCH_VERSION picks the release)
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and exactly pinned, from the index that matches the target device.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY mesh_pb/__init__.py ./mesh_pb/__init__.py
# Stubs are generated here from protos/ with the pinned grpcio-tools (never copied from a host).
RUN pip install --no-cache-dir "grpcio-tools==1.81.*" "protobuf==6.33.*" \
    && python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/mesh_pb/*.proto
COPY mesh ./mesh
COPY gateway ./gateway
COPY router ./router
COPY workers ./workers
COPY compressor ./compressor
RUN pip install --no-cache-dir .

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MAAS_STORE_DIR=/models \
    MAAS_VAR_DIR=/var/lib/maas \
    MAAS_LOG_JSON=true
RUN useradd --no-log-init --create-home --uid 10001 --user-group maas \
    && mkdir -p /models /var/lib/maas \
    && chown maas:maas /models /var/lib/maas
COPY --from=build /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/maas/healthcheck.py
WORKDIR /home/maas
USER 10001:10001
VOLUME ["/models"]
EXPOSE 8001 8002 8101 8201 8301
CMD ["python", "-m", "gateway"]
