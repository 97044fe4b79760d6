# syntax=docker/dockerfile:1
#
# The drain sidecar image.
#   build:  docker build -t sidecar:0.1.0 .
#   run:    docker run --read-only -p 8080:8080 -p 9901:9901 sidecar:0.1.0 --upstream http://app:8000
# Everything after the image name is appended to `sidecar run` (e.g. `--listen`, or `-- CMD ...`
# for wrap mode). Kubernetes manifests live in deploy/ (see docs/kubernetes.md).

ARG PYTHON_VERSION=3.11

# ---- build: turn the project and its dependencies into wheels ------------------------------
FROM python:${PYTHON_VERSION}-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
# The project wheel plus a wheel for every dependency, the uvloop extra included (the full,
# non-slim image has compilers, should a dependency lack a wheel for this platform). Then pin
# exactly what was built into /wheels/requirements.txt (sidecar[uvloop]==..., aiohttp==..., ...),
# which the runtime stage installs.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[uvloop]" \
    && python -c "import pathlib; w = pathlib.Path('/wheels'); \
names = [p.name.split('-')[:2] for p in sorted(w.glob('*.whl'))]; \
pins = [n + ('[uvloop]' if n == 'sidecar' else '') + '==' + v for n, v in names]; \
(w / 'requirements.txt').write_text('\\n'.join(pins) + '\\n')" \
    && cat /wheels/requirements.txt

# ---- runtime: slim Python, the wheels installed, no compilers, no caches ---------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml

# A fixed numeric identity, so that runAsNonRoot can verify it and shareProcessNamespace pods
# can run the application under the same UID (a process may only signal its own UID).
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin sidecar

# The wheels are bind-mounted from the build stage, so they never become a layer of this image.
# pip byte-compiles at install time, so nothing needs writing at run time (read-only root fs).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels --requirement /wheels/requirements.txt \
    && sidecar --help >/dev/null

COPY --chmod=0444 config/sidecar.yaml /etc/sidecar/sidecar.yaml

USER 10001:10001
WORKDIR /
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar", "run"]
