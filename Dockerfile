# metarec: API and worker image (the command picks which: `metarec api`, `metarec worker`).
#
# CPU torch by default. For NVIDIA GPUs build with the CUDA wheels, for example:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t metarec:gpu .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/metarec
RUN useradd --create-home --uid 10001 metarec

# torch first, from its own index, so the dependency install below finds it satisfied
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# dependencies in a layer of their own: rebuilt only when pyproject.toml changes
COPY pyproject.toml README.md ./
RUN mkdir -p app models && touch app/__init__.py models/__init__.py \
    && pip install -e . \
    && rm -rf app models

COPY alembic.ini ./
COPY migrations ./migrations
COPY models ./models
COPY app ./app

RUN mkdir -p var/models && chown -R metarec:metarec var
USER metarec

ENV METAREC_HOST=0.0.0.0 \
    METAREC_PORT=8000 \
    METAREC_DATA_DIR=/srv/metarec/var \
    METAREC_MODEL_STORE_PATH=/srv/metarec/var/models

EXPOSE 8000
CMD ["metarec", "api"]
