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
from twisted.web.resource import Resource

from ._auth import PostgresAuthenticator
from ._auth_cache import CachingAuthenticator
from ._config import SETTINGS, Config, ConfigError, Setting, load_config
from ._consumer import StreamConsumerService
from ._demo import DemoPage
from ._framing import jittered_retry_frame
from ._health import ConsumerCheck, LivenessResource, PostgresCheck, ReadinessResource
from ._heartbeat import HeartbeatService
from ._lifetime import StreamLifetimeService
from ._limits import (
    DescriptorShortageWarnings,
    OpenFileLimit,
    raise_open_file_limit,
    warn_if_limit_below_streams,
)
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
from ._partitions import SINGLE, Partition, SuperStream
from ._replay import ReplayWindow
from ._resource import root_resource
from ._revocation import RevocationEnforcer, RevocationListener
from ._router import MessageRouter
from ._shard import (
    LocalPartition,
    LocalPartitions,
    PartitionedConsumer,
    PartitionGauges,
    WindowsTotal,
)
from ._site import EventStreamSite
from ._stalls import GarbageCollectionTimer, StallMonitorService
from ._streams import StreamRegistry
from ._subscribe import SubscribeResource
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
    """The whole server, one child service per subsystem.

    Children start in the order given (the authenticator, the consumer, the listener, then
    ``others``) and stop in reverse, once the drain has closed the streams. Each has a name
    (L{getServiceNamed}): its key in ``others``, or its role for the first three.

    @ivar registry: the open streams.
    @ivar metrics: what ``/metrics`` serves.
    @ivar log_observer: the JSON log, handed to twistd's application.
    @ivar consumer: the RabbitMQ stream consumer (of every consumed partition).
    @ivar listener: the public TLS listener.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        registry: StreamRegistry,
        metrics: Metrics,
        log_observer: JSONLogObserver,
        *,
        authenticator: IService,
        consumer: StreamConsumerService | PartitionedConsumer,
        subscribe: SubscribeResource,
        listener: ListenerService,
        others: Mapping[str, IService],
    ) -> None:
        super().__init__()
        self.registry = registry
        self.metrics = metrics
        self.log_observer = log_observer
        self.consumer = consumer
        self.listener = listener
        # Asked to let no stream start once the drain has begun.
        self._subscribe = subscribe
        self._config = config
        children = {
            "authenticator": authenticator,
            "consumer": consumer,
            "listener": listener,
            **others,
        }
        for name, child in children.items():
            child.setName(name)
            child.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        """Drain: stop accepting, start no new stream, ask every browser to come back (they
        resume elsewhere with their Last-Event-ID), close each connection once its stream
        has ended (HTTP/2 with GOAWAY), then stop consuming."""
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        await self.listener.stopService()
        self._subscribe.drain()
        self.listener.drain_connections()
        streams = list(self.registry)
        self.log.info("draining {count} streams", count=len(streams))
        retry, jitter = self._config.retry_milliseconds, self._config.reconnect_jitter_milliseconds
        for stream in streams:
            stream.close(jittered_retry_frame(retry, jitter))
        await self.listener.close_connections(self._config.drain_seconds)
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
    windows: WindowsTotal,
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
            "replay_evicted": lambda: windows.evicted,
            "lines_logged": lambda: observer.lines_written,
            "bytes_logged": lambda: observer.bytes_written,
        },
        gauges={"open_streams": lambda: len(registry)},
    )


def _warn_of_development_links(config: Config) -> None:
    log = Logger(namespace="sse_twisted.startup")
    if not config.rabbitmq_tls:
        log.warn("RabbitMQ link is plaintext (SSE_RABBITMQ_TLS=false): for development only")
    if config.postgres_sslmode != "verify-full":
        log.warn(
            "PostgreSQL link is not verify-full (SSE_POSTGRES_SSLMODE={mode}): "
            "for development only",
            mode=config.postgres_sslmode,
        )


def _log_observer(config: Config) -> JSONLogObserver:
    return JSONLogObserver(
        env=config.app_env,
        index=config.log_index,
        logs_dir=config.logs_dir,
        secrets=(config.postgres_password, config.rabbitmq_password),
    )


def _consumer(
    config: Config,
    reactor: Any,
    registry: StreamRegistry,
    window: ReplayWindow,
    live: LiveStart,
    metrics: Metrics,
    on_fatal: Callable[[str], None],
    super_stream: SuperStream | None = None,
) -> StreamConsumerService:
    """RabbitMQ's stream (the window's partition of it), each message routed to the
    streams it is for."""
    return StreamConsumerService(
        config,
        reactor,
        on_message=MessageRouter(registry, window, config.max_message_bytes, metrics),
        on_fatal=on_fatal,
        metrics=metrics,
        live=live,
        queue=window.partition.queue(config.rabbitmq_queue_name),
        super_stream=super_stream,
    )


def _partitions(
    config: Config,
    reactor: Any,
    registry: StreamRegistry,
    metrics: Metrics,
    on_fatal: Callable[[str], None],
) -> LocalPartitions:
    """The consumed partitions, each with its replay window, live start and consumer;
    with more than one, the super stream's layout is declared by each consumer."""
    count = config.rabbitmq_partitions
    super_stream = None
    if count > 1:
        on_fatal = _first_only(on_fatal)
        arguments: dict[str, object] = {
            "x-queue-type": "stream",
            "x-max-age": config.rabbitmq_max_age,
        }
        if config.rabbitmq_initial_cluster_size is not None:
            # Each partition replicated as the single stream would be.
            arguments["x-initial-cluster-size"] = config.rabbitmq_initial_cluster_size
        super_stream = SuperStream(config.rabbitmq_queue_name, count, arguments)
    local = []
    for number in config.partitions:
        partition = SINGLE if count == 1 else Partition(count, number)
        window = ReplayWindow(
            reactor,
            config.replay_seconds,
            config.replay_max_events,
            config.replay_max_bytes,
            partition,
        )
        live = LiveStart(registry, window, reactor, config.future_id_grace_seconds)
        consumer = _consumer(
            config, reactor, registry, window, live, metrics, on_fatal, super_stream
        )
        local.append(LocalPartition(number, window, live, consumer))
    partitions = LocalPartitions(count, local)
    if count > 1:
        metrics.registry.register(PartitionGauges(partitions))
    return partitions


def _first_only(on_fatal: Callable[[str], None]) -> Callable[[str], None]:
    """``on_fatal``, called once: every partition's consumer refuses a layout that does not
    match, and one line says it."""
    said: list[str] = []

    def fatal(reason: str) -> None:
        if not said:
            said.append(reason)
            on_fatal(reason)

    return fatal


def _url_tree(
    config: Config,
    reactor: Any,
    subscribe: SubscribeResource,
    partitions: LocalPartitions,
    authenticator: PostgresAuthenticator,
) -> Resource:
    """``/subscribe``, the health probes, and the demo page in dev."""
    root = root_resource(subscribe)
    root.putChild(b"healthz", LivenessResource())
    queues = ", ".join(
        partition.window.partition.queue(config.rabbitmq_queue_name) for partition in partitions
    )
    readiness = ReadinessResource(
        [ConsumerCheck(partitions.consumer, queues), PostgresCheck(authenticator, reactor)]
    )
    root.putChild(b"readyz", readiness)
    if config.app_env == "dev":
        root.putChild(b"demo", DemoPage())
    return root


def _listener(
    config: Config,
    reactor: Any,
    root: Resource,
    server_tls: ReloadableServerTLS,
    metrics: Metrics,
    on_fatal: Callable[[str], None],
) -> ListenerService:
    """The public TLS port serving ``root``."""
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
    listener = ListenerService(
        tls_endpoint(reactor, config, server_tls),
        site,
        reactor,
        unacknowledged_seconds=config.tcp_user_timeout_seconds,
    )
    listener.listening.addErrback(lambda reason: on_fatal(f"cannot listen: {reason.value}"))
    return listener


def _revocation(
    config: Config,
    reactor: Any,
    auth_cache: CachingAuthenticator,
    registry: StreamRegistry,
) -> dict[str, IService]:
    """PostgreSQL's revocation feed, and what closes the streams it revokes."""
    # The re-check reads the primary the notifications come from, on the feed's connection
    # (the subscriber checks' pool may be on a standby that has not replayed them yet).
    enforcer = RevocationEnforcer(
        auth_cache, registry, lambda pairs: revocations.granted(pairs), reactor
    )
    revocations = RevocationListener(
        config, reactor, enforcer.revoke, on_resynchronised=enforcer.resynchronise
    )
    return {"revocation-enforcer": enforcer, "revocations": revocations}


def _stream_lifetime(
    config: Config, reactor: Any, registry: StreamRegistry, partitions: LocalPartitions
) -> StreamLifetimeService:
    """Each stream closed at its end of life, its browser asked to come back."""
    return StreamLifetimeService(
        registry,
        partitions.window_of,
        reactor,
        config.retry_milliseconds,
        config.reconnect_jitter_milliseconds,
    )


def _metrics_listener(
    config: Config, reactor: Any, metrics: Metrics, on_fatal: Callable[[str], None]
) -> dict[str, IService]:
    """``/metrics`` on its own port, when one is set."""
    if not config.metrics_port:
        return {}
    listener = MetricsListenerService(
        metrics_endpoint(reactor, config.metrics_address, config.metrics_port),
        metrics_site(metrics, reactor),
    )
    listener.listening.addErrback(lambda reason: on_fatal(f"cannot serve metrics: {reason.value}"))
    return {"metrics": listener}


def _process_wide(
    reactor: Any, server_tls: ReloadableServerTLS, open_files: OpenFileLimit | None
) -> dict[str, IService]:
    """What only the process's own server does: certificates reloaded on SIGHUP, and a
    warning when descriptors run short."""
    if open_files is None:
        return {}
    return {
        "certificate-reload": ReloadOnHangup(server_tls.reload, reactor),
        "descriptor-warnings": DescriptorShortageWarnings(reactor, lambda: open_files.soft),
    }


def build_service(
    config: Config,
    reactor: Any,
    on_fatal: Callable[[str], None],
    open_files: OpenFileLimit | None = None,
) -> SSEService:
    """Assemble the service tree for ``config``; ``on_fatal`` ends the process with a reason.

    ``open_files`` (the limit start-up raised) makes it the process's own server: it also
    reloads its certificates on SIGHUP and reports descriptor shortages. Servers run inside
    another process (the tests) leave it out.

    Raises L{ConfigError} when the certificates cannot be loaded, or when a backend link
    is insecure in prod without the opt-out.
    """
    _refuse_insecure_backends_in_prod(config)
    _warn_of_development_links(config)
    metrics = Metrics()
    registry = StreamRegistry()
    partitions = _partitions(config, reactor, registry, metrics, on_fatal)
    consumer = partitions.consumer
    authenticator = PostgresAuthenticator(config, reactor)
    auth_cache = CachingAuthenticator(
        authenticator, reactor, config.auth_cache_seconds, config.auth_cache_size
    )
    subscribe = SubscribeResource(config, registry, auth_cache, reactor, partitions, metrics)
    server_tls = ReloadableServerTLS(config.certs_dir, reactor)
    root = _url_tree(config, reactor, subscribe, partitions, authenticator)
    windows = WindowsTotal([partition.window for partition in partitions])
    metrics.watch(registry, consumer, authenticator, auth_cache, server_tls, replay_window=windows)
    observer = _log_observer(config)
    heartbeats = HeartbeatService(registry, config.heartbeat_seconds, reactor)
    return SSEService(
        config,
        registry,
        metrics,
        observer,
        authenticator=authenticator,
        consumer=consumer,
        subscribe=subscribe,
        listener=_listener(config, reactor, root, server_tls, metrics, on_fatal),
        others={
            **_revocation(config, reactor, auth_cache, registry),
            "stream-lifetime": _stream_lifetime(config, reactor, registry, partitions),
            "heartbeats": heartbeats,
            "stalls": _stall_monitor(
                config, reactor, metrics, observer, heartbeats, registry, windows
            ),
            **_metrics_listener(config, reactor, metrics, on_fatal),
            **_process_wide(reactor, server_tls, open_files),
        },
    )


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
        return build_service(options["config"], reactor, _exit_with_error(reactor), open_files)
    except ConfigError as error:
        raise SystemExit(f"sse-server: {error}") from None
