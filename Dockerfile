# The soundcheck worker image: `docker build -t soundcheck .`
#
#   docker run --rm -e KAFKA_BOOTSTRAP_SERVERS=broker:9092 -e SOUNDCHECK_PSEUDONYM_KEY=... -p 6066:6066 soundcheck
#
# SOUNDCHECK_ENV=production (config/production.yaml) refuses to start without SOUNDCHECK_PSEUDONYM_KEY,
# the secret key user ids are pseudonymised with: pass it at run time (env var / secret), never bake it in.
# Any other setting: SOUNDCHECK__SECTION__KEY=value (e.g. SOUNDCHECK__KAFKA__REPLICATION_FACTOR=1).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Installed editable from /app: soundcheck finds config/ and schemas/ relative to its source tree
# (settings.PROJECT_CONFIG_DIR, contracts.SCHEMA_DIR), so the code must run from here.
COPY . /app
RUN pip install -e . \
    && useradd --create-home --uid 10001 --user-group soundcheck \
    && mkdir -p /app/data \
    && chown soundcheck:soundcheck /app/data

ENV SOUNDCHECK_ENV=production \
    SOUNDCHECK_DATA_DIR=/app/data

USER soundcheck
# /metrics (Prometheus) and /health
EXPOSE 6066
ENTRYPOINT ["soundcheck"]
CMD ["worker"]
