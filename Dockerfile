# chatproxy: a small runtime image. Build and run:
#   docker build -t chatproxy .
#   docker run -p 8000:8000 -e OPENAI_API_KEY -e CHATPROXY_DATABASE_URL=postgresql://... chatproxy
# (or `docker compose up`, see docker-compose.yml). Without CHATPROXY_DATABASE_URL the embedded
# PostgreSQL keeps its data in /data: mount a volume there.
#
# Pre-warm tiktoken's encodings into the image (the build then needs network access; the
# running container does not):
#   docker build --build-arg TIKTOKEN_ENCODINGS="o200k_base cl100k_base" -t chatproxy .
#
# Any builder builds it, the classic one included (DOCKER_BUILDKIT=0): nothing here needs
# BuildKit.

# --- builder: the project and every dependency, installed into a virtualenv ---------------------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# sql/ and config/models.toml are data files of the distribution (pyproject.toml).
COPY sql ./sql
COPY config ./config
RUN /opt/venv/bin/pip install .

# --- runtime: no compiler, no build tools, not root ---------------------------------------------
FROM python:3.11-slim

# (hadolint takes "TOKEN" in these names for a secret: they hold encoding names and a path.)
# hadolint ignore=DL3064
ARG TIKTOKEN_ENCODINGS=""

# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken \
    CHATPROXY_DATA_DIR=/data

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/chatproxy chatproxy

# Only the installed virtualenv comes over (same base image, so the same /usr/local/bin/python):
# no source tree, no pip cache, no build step in this stage.
COPY --from=builder /opt/venv /opt/venv

RUN mkdir -p "$TIKTOKEN_CACHE_DIR" /data \
    && if [ -n "$TIKTOKEN_ENCODINGS" ]; then \
         python -c "import sys, tiktoken; [tiktoken.get_encoding(n) for n in sys.argv[1:]]" \
           $TIKTOKEN_ENCODINGS; \
       fi \
    && chown -R chatproxy:chatproxy "$TIKTOKEN_CACHE_DIR" /data

# The app finds sql/ and config/ in its working directory (config/chatproxy.toml and
# config/models.toml are read from there; mount your own over them to change them).
WORKDIR /app
COPY sql ./sql
COPY config ./config

# The user made above, by number, so that a runtime can tell it is not root (runAsNonRoot).
USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CHATPROXY_PORT', '8000') + '/health', timeout=4)"]

CMD ["chatproxy", "serve", "--host", "0.0.0.0"]
