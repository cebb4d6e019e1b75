# syntax=docker/dockerfile:1

# Build stage: turn the source tree into a wheel so the runtime image holds no source checkout.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# pyproject.toml declares readme = "README.md", so the build needs it in the context.
COPY pyproject.toml README.md ./
COPY decision_router ./decision_router
RUN pip wheel --no-deps --wheel-dir /wheels .

# Runtime stage.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --shell /usr/sbin/nologin app \
    && mkdir -p /app/data \
    && chown app:app /app/data

COPY rules /app/rules
ENV DECISION_ROUTER_RULES_DIR=/app/rules

# The HTTP API and dashboard: on every interface of the container (the default, 127.0.0.1, would be
# unreachable from outside it, even with the port published: docker run -p 8080:8080).
ENV DECISION_ROUTER_API_HOST=0.0.0.0
EXPOSE 8080

# Writable working directory: the default sqlite:///decision_router.db lands here
# when no DECISION_ROUTER_DATABASE_URL is given.
WORKDIR /app/data
USER app

ENTRYPOINT ["decision-router"]
CMD ["serve"]
