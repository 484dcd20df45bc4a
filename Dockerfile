# sse-twisted: `docker build -t sse-twisted .`, then
#   docker run -p 8001:8001 -v "$PWD/certs:/certs:ro" sse-twisted --certs-dir /certs ...
# (every setting is also an SSE_* environment variable; see the README).

FROM python:3.11-slim-bookworm AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sse_twisted ./sse_twisted
COPY twisted ./twisted
# Wheels of the project and of every dependency that pyproject.toml declares, so that the
# final image gets no compiler, pip cache or source tree.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SSE_CERTS_DIR=/certs
RUN groupadd --system --gid 10001 sse \
    && useradd --system --uid 10001 --gid sse --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sse
COPY --from=wheels /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels sse-twisted \
    && rm -rf /wheels \
    # site-packages is read-only for the sse user: build twisted/plugins/dropin.cache now,
    # or twistd would try (and fail, with a warning) to write it on every start.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd --help | grep -q sse-server \
    && install -d -o sse -g sse -m 0750 /certs /var/log/sse
USER sse
# Metrics (SSE_METRICS_PORT, 9464) listen on 127.0.0.1 unless SSE_METRICS_ADDRESS says otherwise.
EXPOSE 8001
# Liveness only (GET /healthz): a backend outage must not get this container restarted.
# The certificate is not checked: it names the public host, not 127.0.0.1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; context = ssl.create_default_context(); context.check_hostname = False; context.verify_mode = ssl.CERT_NONE; urllib.request.urlopen('https://127.0.0.1:%s/healthz' % os.environ.get('SSE_PORT', '8001'), context=context, timeout=4)"]
ENTRYPOINT ["twistd", "-n", "--pidfile=", "sse-server"]
