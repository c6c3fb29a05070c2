# The calcsvc image. The same image runs the calculator server
# ("calcsvc serve") and the demo client ("calcsvc demo"); docker-compose.yml
# starts both.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only the files the package is built from, so that nothing else in the
# checkout (a virtual environment, caches) ends up in the image.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY calcsvc ./calcsvc
RUN pip install ".[redis]"

RUN useradd --system --no-create-home calcsvc
USER calcsvc
WORKDIR /

# gRPC, server metrics, client metrics.
EXPOSE 8080 9464 9465

ENTRYPOINT ["calcsvc"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--metrics-port", "9464"]
