# servekit in a container: the instance runs in the foreground (`servekit run`), so the
# container lives as long as it serves, its logs go to the container's output, and SIGTERM
# drains it. Build from the repository's root:
#
#     docker build -t servekit .
#     docker run -p 8000:8000 servekit
#
# It serves examples/deploy (a deploy file and its model). For your own code, replace the
# COPY of /app below with your files and the CMD with your deploy file or module:function.

FROM python:3.11-slim

# tini as PID 1: it hands SIGTERM to servekit and reaps the processes servekit starts.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# servekit from this source tree (pyproject.toml, README.md and src/ are what it builds from).
COPY pyproject.toml README.md /src/servekit/
COPY src /src/servekit/src
RUN pip install /src/servekit && rm -rf /src/servekit

# A user of its own, not root; the number is what Kubernetes' runAsNonRoot can check.
RUN groupadd --gid 10001 servekit \
    && useradd --uid 10001 --gid servekit --create-home --shell /usr/sbin/nologin servekit
# Everything servekit writes (the instance's sockets, state and logs) goes under /tmp, so the
# root filesystem can be read-only (mount an emptyDir at /tmp).
ENV SERVEKIT_HOME=/tmp/servekit

WORKDIR /app
COPY --chown=10001:10001 examples/deploy/ /app/
USER 10001:10001

EXPOSE 8000
# Liveness. /-/ready (200 once every routed endpoint can serve) is the readiness check;
# Docker has one health check, Kubernetes both (deploy/kubernetes/).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/-/healthz', timeout=2).status != 200)"]

ENTRYPOINT ["tini", "--", "servekit", "run", "--http-host", "0.0.0.0", "--http-port", "8000"]
CMD ["deploy.yaml"]
