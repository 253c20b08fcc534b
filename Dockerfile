# pbrf-audit image: the same code runs the API (`pbrf-audit api`), the worker (`pbrf-audit worker`)
# and the one-shot migration (`pbrf-audit migrate`); docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PBRF_DATA_DIR=/data

WORKDIR /srv/pbrf-audit

# torch first (the largest layer, changes least); pinned like the Makefile.
RUN pip install torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install .

# Run as an unprivileged user; /data holds artifacts (mount a volume shared by api and worker).
RUN useradd --create-home --uid 10001 pbrf && mkdir -p /data && chown pbrf:pbrf /data
USER pbrf

EXPOSE 8000
CMD ["pbrf-audit", "api", "--host", "0.0.0.0", "--port", "8000"]
