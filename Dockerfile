# keymount admission webhook: slim, non-root, `keymount serve`.
#   docker build -t keymount:0.2.0 .
# The Deployment in manifests/ configures it through KEYMOUNT_* environment variables.

# --- build: install keymount and its dependencies into a virtualenv ---------------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/keymount
ENV PATH=/opt/keymount/bin:$PATH

WORKDIR /src
# Exactly the locked versions, each checked against its hash (requirements.lock; to
# refresh it, see README.md, "Dependencies"); then keymount itself, adding nothing.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY webhook/ webhook/
COPY keymount/ keymount/
RUN pip install --no-cache-dir --no-deps .

# --- runtime ------------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/keymount/bin:$PATH

# A fixed numeric uid/gid, so Kubernetes can verify runAsNonRoot (manifests use 10001).
RUN groupadd --gid 10001 keymount \
    && useradd --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin keymount

COPY --from=build /opt/keymount /opt/keymount

WORKDIR /
USER 10001

# 8443: HTTPS admission webhook; 8080: plain-HTTP /healthz, /readyz, /metrics.
EXPOSE 8443 8080

ENTRYPOINT ["keymount"]
CMD ["serve"]
