# tokengate: multi-stage build; the final image holds the runtime dependencies only.
#   docker build -t tokengate --build-arg VERSION=0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" --build-arg SOURCE_URL=<repository URL> .
#   docker run -p 8080:8080 -p 9000:9000 -p 9100:9100 -v tokengate-data:/var/lib/tokengate tokengate

# The base image, pinned by digest: every build starts from the same bytes, and a new
# upstream image comes in only by changing this line. This digest is python:3.11-slim as
# published on 2026-08-05: Python 3.11.15 on Debian 13 (trixie), all platforms.
# To bump it, look up the tag's current digest (the multi-platform index) and paste it
# here, then rebuild and run the image's checks:
#   docker buildx imagetools inspect python:3.11-slim          (its "Digest:" line)
#   or: docker pull python:3.11-slim && docker inspect --format '{{index .RepoDigests 0}}' python:3.11-slim
ARG PYTHON_IMAGE=python:3.11-slim@sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python -m venv /opt/tokengate
# The dependencies first: pyproject.toml's [project].dependencies at the versions in
# constraints.txt. This layer is rebuilt only when one of these two files changes, not
# on every change to the code.
COPY pyproject.toml constraints.txt ./
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' > requirements.txt \
 && /opt/tokengate/bin/pip install --no-cache-dir --disable-pip-version-check -c constraints.txt -r requirements.txt
# Then tokengate itself, on top of them.
COPY README.md LICENSE ./
COPY tokengate ./tokengate
COPY authserver ./authserver
COPY gateway ./gateway
RUN /opt/tokengate/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps . \
 && /opt/tokengate/bin/pip check

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=""
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="tokengate" \
      org.opencontainers.image.description="API gateway with an embedded OAuth 2.0 / OpenID Connect authorization server" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE_URL}"
RUN groupadd --system --gid 10001 tokengate \
 && useradd --system --uid 10001 --gid tokengate --home-dir /var/lib/tokengate --create-home tokengate
COPY --from=build /opt/tokengate /opt/tokengate
COPY config/container.yaml /etc/tokengate/tokengate.yaml
ENV PATH=/opt/tokengate/bin:$PATH \
    TOKENGATE_CONFIG=/etc/tokengate/tokengate.yaml \
    TOKENGATE_PUBLIC_URL=http://localhost:9000 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/tokengate
USER 10001:10001
# Data (signing keys and the SQLite store) lives here: a volume, so it is never in the
# container's writable layer and survives a replaced container, and the image also runs
# with --read-only. Name it (-v tokengate-data:/var/lib/tokengate) to keep it findable.
# The config is no volume: mount your own file over /etc/tokengate/tokengate.yaml.
VOLUME ["/var/lib/tokengate"]
# gateway, authorization server, admin (/healthz, /readyz, /metrics)
EXPOSE 8080 9000 9100
# Alive = the admin listener answers /healthz (the image has Python, not curl). An
# admin listener on another address: set TOKENGATE_HEALTHCHECK_URL.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('TOKENGATE_HEALTHCHECK_URL', 'http://127.0.0.1:9100/healthz'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tokengate"]
CMD ["run"]
