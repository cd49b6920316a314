# MailSender worker image: `docker build -t mailsender .`
# Runs `mailsender worker`; the configuration is mounted at /config/mailsender.yaml
# (MAILSENDER_CONFIG). The same image runs Flower: `celery -A worker flower`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir producer worker \
 && touch producer/__init__.py worker/__init__.py \
 && pip install . "flower>=2.0" \
 && pip uninstall --yes mailsender \
 && rm -rf producer worker build

COPY producer ./producer
COPY worker ./worker
RUN pip install --no-deps . && rm -rf build

RUN useradd --system --create-home --home-dir /home/mailsender --uid 10001 \
        --shell /usr/sbin/nologin mailsender
USER mailsender
WORKDIR /home/mailsender

ENV MAILSENDER_CONFIG=/config/mailsender.yaml

# The worker's node name is celery@<container hostname>; it must answer a ping in time.
HEALTHCHECK --interval=30s --timeout=20s --start-period=30s --retries=3 \
    CMD celery -A worker inspect ping --destination "celery@$HOSTNAME" --timeout 10 \
        > /dev/null || exit 1

# SIGTERM is Celery's warm shutdown: running tasks finish, the rest stays on the queue.
STOPSIGNAL SIGTERM
CMD ["mailsender", "worker"]
