# tokengate: multi-stage build; the final image holds the runtime dependencies only.
#   docker build -t tokengate .
#   docker run -p 8080:8080 -p 9000:9000 -p 9100:9100 tokengate
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY tokengate ./tokengate
COPY authserver ./authserver
COPY gateway ./gateway
RUN python -m venv /opt/tokengate \
 && /opt/tokengate/bin/pip install --no-cache-dir --disable-pip-version-check -c constraints.txt .

FROM python:3.11-slim
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
# config (mount a ConfigMap here) and data (signing keys + SQLite store: keep it)
VOLUME ["/etc/tokengate", "/var/lib/tokengate"]
# gateway, authorization server, admin (/healthz, /readyz, /metrics)
EXPOSE 8080 9000 9100
STOPSIGNAL SIGTERM
ENTRYPOINT ["tokengate"]
CMD ["run"]
