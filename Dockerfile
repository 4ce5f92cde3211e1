# inspection-audit worker image (also runs `db upgrade`, `enqueue`, `review`).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, pinned exactly, in its own layer (it is by far the largest).
RUN pip install torch==2.14.1 torchvision==0.29.1

COPY . /app
RUN pip install . && useradd --create-home --uid 10001 audit \
    && mkdir -p /results /tmp/inspection-audit && chown audit /results /tmp/inspection-audit

USER audit
ENV INSPECTION_AUDIT_HOME=/tmp/inspection-audit

CMD ["inspection-audit", "worker", "--device", "cpu"]
