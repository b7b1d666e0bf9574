# syntax=docker/dockerfile:1
# The gateway as a container image: the same command as `make run`, without the embedded
# servers. The `embedded` extra is not installed, so DATABASE_URL and REDIS_URL are required
# (`serve` exits with a clear message without them).
#
#   docker build -t llm-gateway .
#   docker run -p 8080:8080 -e DATABASE_URL=postgresql://... -e REDIS_URL=redis://... llm-gateway
#
# The default command serves in sandbox mode with a demo organization, exactly like
# `make run`. For production, override the command without `--sandbox --demo` (and set
# GATEWAY_ADMIN_KEY and the providers' key variables), e.g.
#   docker run ... llm-gateway llm-gateway serve --config /app/config.yaml --host 0.0.0.0 --port 8080 --workers 4
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    GATEWAY_CONFIG=/app/config.yaml \
    GATEWAY_SQL_DIR=/app/sql \
    GATEWAY_HOME=/var/lib/llm-gateway

# A non-root user; its home is $GATEWAY_HOME (the generated admin key, multi-worker metrics).
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/llm-gateway \
        --create-home --shell /usr/sbin/nologin gateway

WORKDIR /app

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when
# pyproject.toml changes, not on every source edit.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself (its dependencies are already there). The migrations in sql/ are
# found through $GATEWAY_SQL_DIR, since the packages are installed into site-packages.
COPY README.md config.yaml ./
COPY sql ./sql
COPY gateway ./gateway
COPY policies ./policies
COPY ledger ./ledger
RUN pip install --no-deps . \
    && rm -rf build *.egg-info

USER 10001:10001

EXPOSE 8080

# Liveness on the port CMD serves on (change both together); slim images have no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

# `make run` (serve --config config.yaml --sandbox --demo), listening on every interface.
# Operators drop --sandbox --demo for production by overriding CMD (see the top of this file).
CMD ["llm-gateway", "serve", "--config", "/app/config.yaml", "--host", "0.0.0.0", "--port", "8080", "--sandbox", "--demo"]
