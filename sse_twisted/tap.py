"""``twistd sse-server``: the command-line options and the service tree."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from ._auth import PostgresAuthenticator
from ._auth_cache import CachingAuthenticator
from ._config import SETTINGS, Config, ConfigError, Setting, load_config
from ._consumer import StreamConsumerService
from ._demo import DemoPage
from ._framing import jittered_retry_frame
from ._health import ConsumerCheck, LivenessResource, PostgresCheck, ReadinessResource
from ._heartbeat import HeartbeatService
from ._lifetime import StreamLifetimeService
from ._limits import DescriptorShortageWarnings, raise_open_file_limit, warn_if_limit_below_streams
from ._listener import ListenerService, tls_endpoint
from ._live import LiveStart
from ._logging import JSONLogObserver, bridge_standard_logging
from ._metrics import (
    Metrics,
    MetricsListenerService,
    counter_total,
    metrics_endpoint,
    metrics_site,
)
from ._replay import ReplayWindow
from ._resource import EventStreamSite, SubscribeResource, root_resource
from ._revocation import RevocationEnforcer, RevocationListener
from ._router import MessageRouter
from ._stalls import GarbageCollectionTimer, StallMonitorService
from ._streams import StreamRegistry
from ._tls_reload import ReloadableServerTLS, ReloadOnHangup

__all__ = ["Options", "SSEService", "build_service", "makeService"]


def _option_help(setting: Setting) -> str:
    text = f"{setting.help} [{setting.env}, default {setting.default!r}]"
    if setting.secret:
        # Every local user can read a process's arguments (ps, /proc/<pid>/cmdline).
        text += f"; visible in `ps`: prefer --{setting.option}-file or {setting.env}_FILE"
    return text


class Options(usage.Options):
    """Every setting as an option; each defaults to its ``SSE_*`` variable, then to the default.

    A value the server cannot run with ends the command with one line naming the setting.
    """

    optParameters = [
        [setting.option, None, None, _option_help(setting)] for setting in SETTINGS
    ] + [
        [
            f"{setting.option}-file",
            None,
            None,
            f"file holding the {setting.help} (trailing newlines ignored) [{setting.env}_FILE]",
        ]
        for setting in SETTINGS
        if setting.secret
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ

    def postOptions(self) -> None:
        """Build the immutable L{Config}; exit with one line when a value is unusable."""
        names = [setting.option for setting in SETTINGS]
        names += [f"{setting.option}-file" for setting in SETTINGS if setting.secret]
        overrides = {name: self[name] for name in names}
        try:
            self["config"] = load_config(self._environ, overrides)
        except ConfigError as error:
            # twistd prints the whole usage text for a UsageError; one line is clearer.
            raise SystemExit(f"sse-server: {error}") from None


class SSEService(MultiService):
    """The whole server: listener, stream registry, authenticator, consumer and heartbeats."""

    log = Logger()
    # Set by build_service: the subscriber-check cache (its counters), the revocation feed
    # and the browser-facing TLS identity.
    auth_cache: CachingAuthenticator | None = None
    revocations: RevocationListener | None = None
    # Set by build_service: asked to let no stream start once the drain has begun.
    subscribe: SubscribeResource | None = None
    server_tls: ReloadableServerTLS
    metrics: Metrics

    def __init__(
        self,
        registry: StreamRegistry,
        listener: ListenerService,
        authenticator: PostgresAuthenticator,
        consumer: StreamConsumerService,
        log_observer: JSONLogObserver,
        config: Config,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.listener = listener
        self.authenticator = authenticator
        self.consumer = consumer
        self.log_observer = log_observer
        self._drain_seconds = config.drain_seconds
        self._retry_milliseconds = config.retry_milliseconds
        self._jitter_milliseconds = config.reconnect_jitter_milliseconds
        for child in (authenticator, consumer, listener):
            child.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        """Drain: stop accepting, start no new stream, ask every browser to come back (they
        resume elsewhere with their Last-Event-ID), close each connection once its stream
        has ended (HTTP/2 with GOAWAY), then stop consuming."""
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        await self.listener.stopService()
        if self.subscribe is not None:
            self.subscribe.drain()
        self.listener.drain_connections()
        streams = list(self.registry)
        self.log.info("draining {count} streams", count=len(streams))
        for stream in streams:
            stream.close(jittered_retry_frame(self._retry_milliseconds, self._jitter_milliseconds))
        await self.listener.close_connections(self._drain_seconds)
        await super().stopService()

    def setServiceParent(self, parent: Any) -> None:
        """Also hand twistd our JSON observer: it looks for one on the application."""
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)


# libpq modes that do not check the server's certificate: anyone on the path may answer.
_UNVERIFIED_SSLMODES = ("disable", "allow", "prefer", "require")


def _refuse_insecure_backends_in_prod(config: Config) -> None:
    """Raise L{ConfigError} for a plaintext or unverified backend link in prod, unless
    C{allow_insecure_backends} says the operator means it (then it is only a warning)."""
    if config.app_env != "prod" or config.allow_insecure_backends:
        return
    problems = []
    if not config.rabbitmq_tls:
        problems.append("SSE_RABBITMQ_TLS=false (plaintext RabbitMQ)")
    if config.postgres_sslmode in _UNVERIFIED_SSLMODES:
        problems.append(
            f"SSE_POSTGRES_SSLMODE={config.postgres_sslmode} (below verify-ca: the "
            f"PostgreSQL server is not verified)"
        )
    if problems:
        raise ConfigError(
            f"refused in prod: {', '.join(problems)}; use TLS, or set "
            f"SSE_ALLOW_INSECURE_BACKENDS=true to start anyway"
        )


def _stall_monitor(
    config: Config,
    reactor: Any,
    metrics: Metrics,
    observer: JSONLogObserver,
    heartbeats: HeartbeatService,
    registry: StreamRegistry,
    window: ReplayWindow,
) -> StallMonitorService:
    """The reactor-lag and collection monitor, told what each component did in a stall."""
    return StallMonitorService(
        reactor,
        metrics.reactor_lag_seconds,
        GarbageCollectionTimer(metrics.gc_pause_seconds),
        config.stall_log_milliseconds / 1000,
        activity={
            "messages_consumed": lambda: counter_total(metrics.messages_consumed),
            "events_delivered": lambda: counter_total(metrics.events_delivered),
            "keep_alives": lambda: heartbeats.keep_alives_written,
            "replay_evicted": lambda: window.evicted,
            "lines_logged": lambda: observer.lines_written,
            "bytes_logged": lambda: observer.bytes_written,
        },
        gauges={"open_streams": lambda: len(registry)},
    )


def build_service(config: Config, reactor: Any, on_fatal: Callable[[str], None]) -> SSEService:
    """Assemble the service tree for ``config``; ``on_fatal`` ends the process with a reason.

    Raises L{ConfigError} when the certificates cannot be loaded, or when a backend link
    is insecure in prod without the opt-out.
    """
    _refuse_insecure_backends_in_prod(config)
    log = Logger(namespace="sse_twisted.startup")
    observer = JSONLogObserver(
        env=config.app_env,
        index=config.log_index,
        logs_dir=config.logs_dir,
        secrets=(config.postgres_password, config.rabbitmq_password),
    )
    if not config.rabbitmq_tls:
        log.warn("RabbitMQ link is plaintext (SSE_RABBITMQ_TLS=false): for development only")
    if config.postgres_sslmode != "verify-full":
        log.warn(
            "PostgreSQL link is not verify-full (SSE_POSTGRES_SSLMODE={mode}): "
            "for development only",
            mode=config.postgres_sslmode,
        )
    metrics = Metrics()
    registry = StreamRegistry()
    window = ReplayWindow(
        reactor, config.replay_seconds, config.replay_max_events, config.replay_max_bytes
    )
    authenticator = PostgresAuthenticator(config, reactor)
    auth_cache = CachingAuthenticator(
        authenticator, reactor, config.auth_cache_seconds, config.auth_cache_size
    )
    enforcer = RevocationEnforcer(auth_cache, registry, authenticator.granted, reactor)
    revocations = RevocationListener(
        config, reactor, enforcer.revoke, on_resynchronised=enforcer.resynchronise
    )
    live = LiveStart(registry, window, reactor, config.future_id_grace_seconds)
    consumer = StreamConsumerService(
        config,
        reactor,
        on_message=MessageRouter(registry, window, config.max_message_bytes, metrics),
        on_fatal=on_fatal,
        metrics=metrics,
        live=live,
    )
    subscribe = SubscribeResource(
        registry,
        auth_cache,
        reactor,
        window,
        live,
        cors_origins=config.cors_origins,
        retry_milliseconds=config.retry_milliseconds,
        max_buffer_bytes=config.max_buffer_bytes,
        metrics=metrics,
        max_streams_per_user=config.max_streams_per_user,
        max_streams=config.max_streams,
        max_stream_seconds=config.max_stream_seconds,
        max_checks_per_client=config.max_auth_checks_per_client,
        retry_jitter_milliseconds=config.reconnect_jitter_milliseconds,
    )
    root = root_resource(subscribe)
    root.putChild(b"healthz", LivenessResource())
    readiness = ReadinessResource(
        [ConsumerCheck(consumer, config.rabbitmq_queue_name), PostgresCheck(authenticator, reactor)]
    )
    root.putChild(b"readyz", readiness)
    if config.app_env == "dev":
        root.putChild(b"demo", DemoPage())
    site = EventStreamSite(
        root,
        reactor,
        max_header_bytes=config.max_header_bytes,
        request_timeout=config.header_timeout_seconds,
        max_body_bytes=config.max_body_bytes,
        metrics=metrics,
        trusted_proxies=config.trusted_proxies,
    )
    # HTTP/2 drops every stream of a connection idle for Site.timeOut: heartbeats must
    # come well within it.
    site.timeOut = max(60, 3 * config.heartbeat_seconds)
    server_tls = ReloadableServerTLS(config.certs_dir, reactor)
    listener = ListenerService(
        tls_endpoint(reactor, config, server_tls),
        site,
        reactor,
        unacknowledged_seconds=config.tcp_user_timeout_seconds,
    )
    listener.listening.addErrback(lambda reason: on_fatal(f"cannot listen: {reason.value}"))
    service = SSEService(registry, listener, authenticator, consumer, observer, config)
    service.auth_cache = auth_cache
    service.metrics = metrics
    service.revocations = revocations
    service.subscribe = subscribe
    service.server_tls = server_tls
    enforcer.setServiceParent(service)
    revocations.setServiceParent(service)
    StreamLifetimeService(
        registry,
        window,
        reactor,
        config.retry_milliseconds,
        config.reconnect_jitter_milliseconds,
    ).setServiceParent(service)
    heartbeats = HeartbeatService(registry, config.heartbeat_seconds, reactor)
    heartbeats.setServiceParent(service)
    _stall_monitor(
        config, reactor, metrics, observer, heartbeats, registry, window
    ).setServiceParent(service)
    metrics.watch(registry, consumer, authenticator, auth_cache, server_tls, replay_window=window)
    if config.metrics_port:
        metrics_listener = MetricsListenerService(
            metrics_endpoint(reactor, config.metrics_address, config.metrics_port),
            metrics_site(metrics),
        )
        metrics_listener.setName("metrics")
        metrics_listener.listening.addErrback(
            lambda reason: on_fatal(f"cannot serve metrics: {reason.value}")
        )
        metrics_listener.setServiceParent(service)
    return service


def _exit_with_error(reactor: Any) -> Callable[[str], None]:
    log = Logger(namespace="sse_twisted.startup")

    def fatal(reason: str) -> None:
        log.critical("{reason}", reason=reason)
        # twistd has no way to set a non-zero exit status after the reactor runs:
        # leave once the shutdown (and its log lines) is complete.
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        reactor.callWhenRunning(reactor.stop)

    return fatal


def makeService(options: Options) -> IService:
    """twistd entry point: the service tree for the parsed options."""
    from twisted.internet import reactor

    bridge_standard_logging()
    # What start-up allocated lives as long as the process: keep the collector from
    # rescanning it, and collect young objects less often (per-connection CPU -25% in
    # a connect storm, bench S4).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    # Before anything listens: each stream holds a descriptor, and shells and systemd
    # start us with a soft limit of 1,024.
    open_files = raise_open_file_limit()
    warn_if_limit_below_streams(open_files, options["config"].max_streams)
    try:
        service = build_service(options["config"], reactor, _exit_with_error(reactor))
    except ConfigError as error:
        raise SystemExit(f"sse-server: {error}") from None
    ReloadOnHangup(service.server_tls.reload, reactor).setServiceParent(service)
    DescriptorShortageWarnings(reactor, lambda: open_files.soft).setServiceParent(service)
    return service
