"""The server's settings: one immutable object built from defaults < environment < options."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._broker_nodes import parse_broker_nodes

__all__ = ["SETTINGS", "Config", "ConfigError", "Setting", "load_config"]

POSTGRES_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
POSTGRES_TARGET_SESSION_ATTRS = (
    "any",
    "read-write",
    "read-only",
    "primary",
    "standby",
    "prefer-standby",
)
APP_ENVS = ("dev", "prod")
LISTEN_SOCKETS = ("bind", "systemd")


# A paced read waits at most this long: under the consumer's 0.2 s wait for the rest of a
# chunk, and a delay a reader of live notifications does not notice.
_MAX_BATCH_MILLISECONDS = 100


class ConfigError(Exception):
    """A setting has a value the server cannot run with; the message names it."""


def _port(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a port number")
    number = int(text)
    if number > 65535:
        raise ValueError(f"{number} is out of range 0-65535")
    return number


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise ValueError(f"{text!r} is not a positive integer")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a non-negative integer")
    return int(text)


def _batch_interval(text: str) -> int:
    milliseconds = _non_negative_int(text)
    if milliseconds > _MAX_BATCH_MILLISECONDS:
        raise ValueError(f"{milliseconds} is over {_MAX_BATCH_MILLISECONDS} (milliseconds)")
    return milliseconds


def _positive_float(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(number) or not number > 0:
        raise ValueError(f"{text!r} must be a finite number greater than 0")
    return number


def _non_negative_float(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(number) or not number >= 0:
        raise ValueError(f"{text!r} must be a finite number, 0 or more")
    return number


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true or false)")


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _text(text: str) -> str:
    return text


def _ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def _networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(part.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not an IP address or network") from None
    return tuple(networks)


def _existing_directory(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise ValueError(f"{text!r} is not a directory")
    return path


def _optional_directory(text: str) -> Path | None:
    if not text:
        return None
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{text!r} exists and is not a directory")
    return path


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(origin.strip() for origin in text.split(",") if origin.strip())
    if not origins:
        raise ValueError("must list at least one origin, or *")
    return origins


_MAX_AGE = re.compile(r"[1-9][0-9]*(Y|M|D|h|m|s)")


def _host_list(text: str) -> str:
    hosts = [host.strip() for host in text.split(",")]
    if not all(hosts):
        raise ValueError(f"{text!r} has an empty host")
    return ",".join(hosts)


def _ports(text: str) -> tuple[int, ...]:
    return tuple(_port(port.strip()) for port in text.split(","))


def _broker_node_list(text: str) -> str:
    # The port is checked here; the default port is only known with every setting read.
    parse_broker_nodes(text, 1)
    return text


def _optional_positive_int(text: str) -> int | None:
    return _positive_int(text) if text else None


def _max_age(text: str) -> str:
    if not _MAX_AGE.fullmatch(text):
        raise ValueError(f"{text!r} is not a RabbitMQ max-age such as 7D, 12h or 30m")
    return text


_MAX_PARTITIONS = 1024


def _partition_count(text: str) -> int:
    count = _positive_int(text)
    if count > _MAX_PARTITIONS:
        raise ValueError(f"{count} is more than {_MAX_PARTITIONS} partitions")
    return count


def _partition_numbers(text: str) -> tuple[int, ...]:
    numbers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isascii() or not part.isdigit():
            raise ValueError(f"{part!r} is not a partition number")
        if int(part) in numbers:
            raise ValueError(f"partition {int(part)} is listed twice")
        numbers.append(int(part))
    return tuple(sorted(numbers))


@dataclass(frozen=True)
class Setting:
    """One configurable value: its environment name, twistd option, default and parser."""

    field: str
    env: str
    option: str
    default: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("app_env", "SSE_APP_ENV", "app-env", "prod", _one_of(APP_ENVS), "dev or prod"),
    Setting("port", "SSE_PORT", "port", "8001", _port, "TLS port for browsers (0 = any free)"),
    Setting(
        "listen_address",
        "SSE_LISTEN_ADDRESS",
        "listen-address",
        "0.0.0.0",
        _non_empty,
        "address the TLS port binds to",
    ),
    Setting(
        "listen_socket",
        "SSE_LISTEN_SOCKET",
        "listen-socket",
        "bind",
        _one_of(LISTEN_SOCKETS),
        "bind: bind the TLS port itself; systemd: serve on the socket systemd passes "
        "(socket activation: a restart refuses no connection)",
    ),
    Setting(
        "metrics_port",
        "SSE_METRICS_PORT",
        "metrics-port",
        "9464",
        _port,
        "plain-HTTP port serving Prometheus `/metrics` (0 = off)",
    ),
    Setting(
        "metrics_address",
        "SSE_METRICS_ADDRESS",
        "metrics-address",
        "127.0.0.1",
        _ip_address,
        "address the metrics port binds to; keep it private",
    ),
    Setting(
        "stall_log_milliseconds",
        "SSE_STALL_LOG_MS",
        "stall-log-ms",
        "50",
        _non_negative_int,
        "log a line, with what ran, when the reactor runs a tick this late (0 = never)",
    ),
    Setting(
        "listen_backlog",
        "SSE_LISTEN_BACKLOG",
        "listen-backlog",
        "4096",
        _positive_int,
        "queue of connections not yet accepted (a reconnect storm overflows a small one)",
    ),
    Setting(
        "tcp_user_timeout_seconds",
        "SSE_TCP_USER_TIMEOUT_SECONDS",
        "tcp-user-timeout-seconds",
        "45",
        _non_negative_float,
        "close a connection whose sent data stays unacknowledged this long (0 = kernel default)",
    ),
    Setting("log_index", "SSE_LOG_INDEX", "log-index", "sse", _non_empty, "`index` log field"),
    Setting(
        "logs_dir",
        "SSE_LOGS_DIR",
        "logs-dir",
        "",
        _optional_directory,
        "directory for daily JSON log files (empty = stdout only)",
    ),
    Setting(
        "certs_dir",
        "SSE_CERTS_DIR",
        "certs-dir",
        "certs",
        _existing_directory,
        "directory holding the certificate files",
    ),
    Setting(
        "postgres_host",
        "SSE_POSTGRES_HOST",
        "postgres-host",
        "localhost",
        _host_list,
        "PostgreSQL host, or hosts tried in turn (`host1,host2`, libpq's multi-host form; "
        "verify-full checks each one's certificate against its name)",
    ),
    Setting(
        "postgres_port",
        "SSE_POSTGRES_PORT",
        "postgres-port",
        "5432",
        _ports,
        "PostgreSQL port, or one per host (`5432,5433`)",
    ),
    Setting(
        "postgres_username",
        "SSE_POSTGRES_USERNAME",
        "postgres-username",
        "postgres",
        _non_empty,
        "PostgreSQL user",
    ),
    Setting(
        "postgres_password",
        "SSE_POSTGRES_PASSWORD",
        "postgres-password",
        "",
        _text,
        "PostgreSQL password",
        secret=True,
    ),
    Setting(
        "postgres_db_name",
        "SSE_POSTGRES_DB_NAME",
        "postgres-db-name",
        "postgres",
        _non_empty,
        "database holding the users table",
    ),
    Setting(
        "postgres_sslmode",
        "SSE_POSTGRES_SSLMODE",
        "postgres-sslmode",
        "verify-full",
        _one_of(POSTGRES_SSLMODES),
        "libpq sslmode (disable = plaintext)",
    ),
    Setting(
        "postgres_pool_size",
        "SSE_POSTGRES_POOL_SIZE",
        "postgres-pool-size",
        "4",
        _positive_int,
        "PostgreSQL connections in the pool",
    ),
    Setting(
        "postgres_timeout_seconds",
        "SSE_POSTGRES_TIMEOUT_SECONDS",
        "postgres-timeout-seconds",
        "5",
        _positive_float,
        "how long a subscribe waits for the auth query",
    ),
    Setting(
        "postgres_target_session_attrs",
        "SSE_POSTGRES_TARGET_SESSION_ATTRS",
        "postgres-target-session-attrs",
        "any",
        _one_of(POSTGRES_TARGET_SESSION_ATTRS),
        "which of several hosts will do (libpq target_session_attrs; auth only reads, so a "
        "standby serves it)",
    ),
    Setting(
        "max_pending_auth_checks",
        "SSE_MAX_PENDING_AUTH_CHECKS",
        "max-pending-auth-checks",
        "256",
        _positive_int,
        "subscriber checks waiting for PostgreSQL; more are asked to come back later",
    ),
    Setting(
        "max_auth_checks_per_client",
        "SSE_MAX_AUTH_CHECKS_PER_CLIENT",
        "max-auth-checks-per-client",
        "4",
        _positive_int,
        "subscriber checks one client address may have waiting at once",
    ),
    Setting(
        "auth_cache_seconds",
        "SSE_AUTH_CACHE_SECONDS",
        "auth-cache-seconds",
        "10",
        _non_negative_float,
        "how long a granted (userid, token) pair is remembered (0 = not at all)",
    ),
    Setting(
        "auth_cache_size",
        "SSE_AUTH_CACHE_SIZE",
        "auth-cache-size",
        "10000",
        _positive_int,
        "most (userid, token) pairs remembered",
    ),
    Setting(
        "rabbitmq_host",
        "SSE_RABBITMQ_HOST",
        "rabbitmq-host",
        "localhost",
        _broker_node_list,
        "RabbitMQ node, or cluster nodes tried in turn (`host`, `host:port`, comma-separated; "
        "TLS checks each one's certificate against its name)",
    ),
    Setting(
        "rabbitmq_port",
        "SSE_RABBITMQ_PORT",
        "rabbitmq-port",
        "",
        _port,
        "RabbitMQ port (default 5671 with TLS, 5672 without)",
    ),
    Setting(
        "rabbitmq_username",
        "SSE_RABBITMQ_USERNAME",
        "rabbitmq-username",
        "guest",
        _non_empty,
        "RabbitMQ user",
    ),
    Setting(
        "rabbitmq_password",
        "SSE_RABBITMQ_PASSWORD",
        "rabbitmq-password",
        "guest",
        _text,
        "RabbitMQ password",
        secret=True,
    ),
    Setting("rabbitmq_vhost", "SSE_RABBITMQ_VHOST", "rabbitmq-vhost", "/", _non_empty, "vhost"),
    Setting(
        "rabbitmq_queue_name",
        "SSE_RABBITMQ_QUEUE_NAME",
        "rabbitmq-queue-name",
        "messages",
        _non_empty,
        "stream queue the messages are read from",
    ),
    Setting(
        "rabbitmq_tls",
        "SSE_RABBITMQ_TLS",
        "rabbitmq-tls",
        "true",
        _boolean,
        "amqps with a client certificate (false = plain AMQP)",
    ),
    Setting(
        "rabbitmq_max_age",
        "SSE_RABBITMQ_MAX_AGE",
        "rabbitmq-max-age",
        "1D",
        _max_age,
        "retention of the stream queue when this server declares it",
    ),
    Setting(
        "rabbitmq_prefetch",
        "SSE_RABBITMQ_PREFETCH",
        "rabbitmq-prefetch",
        "1000",
        _positive_int,
        "unacknowledged messages the broker may send ahead",
    ),
    Setting(
        "ingest_batch_milliseconds",
        "SSE_INGEST_BATCH_MS",
        "ingest-batch-ms",
        "0",
        _batch_interval,
        "while messages trickle in, read the broker at most this often (0 = each as it "
        "comes): fewer reactor wake-ups, each message up to this much later; 25, 50 and 100 "
        "share their wake-ups with the 50 ms stall tick",
    ),
    Setting(
        "rabbitmq_heartbeat_seconds",
        "SSE_RABBITMQ_HEARTBEAT_SECONDS",
        "rabbitmq-heartbeat-seconds",
        "10",
        _positive_int,
        "AMQP heartbeat; a dead broker link is noticed after about twice this",
    ),
    Setting(
        "rabbitmq_initial_cluster_size",
        "SSE_RABBITMQ_INITIAL_CLUSTER_SIZE",
        "rabbitmq-initial-cluster-size",
        "",
        _optional_positive_int,
        "nodes a stream queue this server declares is replicated on (empty = broker default)",
    ),
    Setting(
        "heartbeat_seconds",
        "SSE_HEARTBEAT_SECONDS",
        "heartbeat-seconds",
        "15",
        _positive_float,
        "seconds between keep-alive comments on each stream",
    ),
    Setting(
        "retry_milliseconds",
        "SSE_RETRY_MILLISECONDS",
        "retry-milliseconds",
        "3000",
        _positive_int,
        "reconnect delay sent to browsers (retry: field)",
    ),
    Setting(
        "replay_seconds",
        "SSE_REPLAY_SECONDS",
        "replay-seconds",
        "300",
        _non_negative_int,
        "how far back reconnecting browsers are replayed (0 = no replay)",
    ),
    Setting(
        "replay_max_events",
        "SSE_REPLAY_MAX_EVENTS",
        "replay-max-events",
        "100000",
        _positive_int,
        "most events kept for replay",
    ),
    Setting(
        "replay_max_bytes",
        "SSE_REPLAY_MAX_BYTES",
        "replay-max-bytes",
        "33554432",
        _positive_int,
        "most bytes of events kept for replay",
    ),
    Setting(
        "future_id_grace_seconds",
        "SSE_FUTURE_ID_GRACE_SECONDS",
        "future-id-grace-seconds",
        "3",
        _non_negative_float,
        "a Last-Event-ID past the newest event consumed waits this long, then gets reset",
    ),
    Setting(
        "max_stream_seconds",
        "SSE_MAX_STREAM_SECONDS",
        "max-stream-seconds",
        "3600",
        _positive_float,
        "a stream is closed (with a jittered retry:) after about this long, to re-check access",
    ),
    Setting(
        "max_buffer_bytes",
        "SSE_MAX_BUFFER_BYTES",
        "max-buffer-bytes",
        "262144",
        _positive_int,
        "a stream whose client stops reading is closed past this much unsent data",
    ),
    Setting(
        "drain_seconds",
        "SSE_DRAIN_SECONDS",
        "drain-seconds",
        "10",
        _positive_float,
        "on stop, longest wait for connections to close (then those not reading are cut)",
    ),
    Setting(
        "reconnect_jitter_milliseconds",
        "SSE_RECONNECT_JITTER_MILLISECONDS",
        "reconnect-jitter-milliseconds",
        "5000",
        _non_negative_int,
        "on stop or refused for load, a browser comes back after the retry delay plus up to this",
    ),
    Setting(
        "max_message_bytes",
        "SSE_MAX_MESSAGE_BYTES",
        "max-message-bytes",
        "262144",
        _positive_int,
        "larger messages are skipped with a warning",
    ),
    Setting(
        "max_streams_per_user",
        "SSE_MAX_STREAMS_PER_USER",
        "max-streams-per-user",
        "16",
        _positive_int,
        "open streams one user may hold; more are refused with 429",
    ),
    Setting(
        "max_streams",
        "SSE_MAX_STREAMS",
        "max-streams",
        "50000",
        _positive_int,
        "open streams this process holds; more are refused with 429",
    ),
    Setting(
        "max_header_bytes",
        "SSE_MAX_HEADER_BYTES",
        "max-header-bytes",
        "8192",
        _positive_int,
        "request line plus headers (HTTP/1.1); more is refused with 431",
    ),
    Setting(
        "header_timeout_seconds",
        "SSE_HEADER_TIMEOUT_SECONDS",
        "header-timeout-seconds",
        "10",
        _positive_float,
        "a client must send its whole request (head and body) within this; else 408 or a reset",
    ),
    Setting(
        "max_body_bytes",
        "SSE_MAX_BODY_BYTES",
        "max-body-bytes",
        "1024",
        _non_negative_int,
        "largest request body accepted (nothing here takes one); more: 413, or an HTTP/2 reset",
    ),
    Setting(
        "cors_origins",
        "SSE_CORS_ORIGINS",
        "cors-origins",
        "*",
        _origins,
        "comma-separated origins allowed to subscribe, or *",
    ),
    Setting(
        "trusted_proxies",
        "SSE_TRUSTED_PROXIES",
        "trusted-proxies",
        "",
        _networks,
        "comma-separated proxy addresses or networks whose X-Forwarded-For is believed",
    ),
    Setting(
        "allow_insecure_backends",
        "SSE_ALLOW_INSECURE_BACKENDS",
        "allow-insecure-backends",
        "false",
        _boolean,
        "in prod, start even with plaintext RabbitMQ or PostgreSQL sslmode below verify-ca",
    ),
    # Partitioned mode (README, "A sharded fleet").
    Setting(
        "rabbitmq_partitions",
        "SSE_RABBITMQ_PARTITIONS",
        "rabbitmq-partitions",
        "1",
        _partition_count,
        "partitions of the stream (1: one stream queue; more: a super stream of that many)",
    ),
    Setting(
        "partitions",
        "SSE_PARTITIONS",
        "partitions",
        "",
        _partition_numbers,
        "comma-separated partitions this server consumes and serves (empty: all)",
    ),
)


@dataclass(frozen=True)
class Config:
    """Every setting of one server process; secrets are left out of the repr."""

    app_env: str
    port: int
    listen_address: str
    listen_socket: str
    listen_backlog: int
    tcp_user_timeout_seconds: float
    metrics_port: int
    metrics_address: str
    stall_log_milliseconds: int
    log_index: str
    logs_dir: Path | None
    certs_dir: Path
    postgres_host: str
    postgres_port: tuple[int, ...]
    postgres_username: str
    postgres_password: str = field(repr=False)
    postgres_db_name: str
    postgres_sslmode: str
    postgres_pool_size: int
    postgres_timeout_seconds: float
    postgres_target_session_attrs: str
    max_pending_auth_checks: int
    max_auth_checks_per_client: int
    auth_cache_seconds: float
    auth_cache_size: int
    rabbitmq_host: str
    rabbitmq_port: int
    rabbitmq_username: str
    rabbitmq_password: str = field(repr=False)
    rabbitmq_vhost: str
    rabbitmq_queue_name: str
    rabbitmq_tls: bool
    rabbitmq_max_age: str
    rabbitmq_prefetch: int
    ingest_batch_milliseconds: int
    rabbitmq_heartbeat_seconds: int
    rabbitmq_initial_cluster_size: int | None
    heartbeat_seconds: float
    retry_milliseconds: int
    replay_seconds: int
    replay_max_events: int
    replay_max_bytes: int
    future_id_grace_seconds: float
    max_stream_seconds: float
    max_buffer_bytes: int
    drain_seconds: float
    reconnect_jitter_milliseconds: int
    max_message_bytes: int
    max_streams_per_user: int
    max_streams: int
    max_header_bytes: int
    header_timeout_seconds: float
    max_body_bytes: int
    cors_origins: tuple[str, ...]
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    allow_insecure_backends: bool
    rabbitmq_partitions: int
    partitions: tuple[int, ...]


def _raw_value(
    setting: Setting, environ: Mapping[str, str], overrides: Mapping[str, str | None]
) -> tuple[str, str]:
    """The text of ``setting`` and where it came from: an option, else a variable, else the
    default.  A secret may also come from a file (``--x-file``, ``SSE_X_FILE``), which
    stands in for its value at the same level; giving both at one level is an error."""
    option_file, env_file = f"{setting.option}-file", f"{setting.env}_FILE"
    levels = [
        (f"--{setting.option}", overrides.get(setting.option), option_file, overrides),
        (setting.env, environ.get(setting.env), env_file, environ),
    ]
    for name, value, file_key, source in levels:
        path = source.get(file_key) if setting.secret else None
        file_name = f"--{file_key}" if source is overrides else file_key
        if value is not None and path is not None:
            raise ConfigError(f"{name} and {file_name} are both set: keep one")
        if value is not None:
            return value, name
        if path is not None:
            return _read_secret(file_name, path), file_name
    return setting.default, f"{setting.env} (default)"


def _read_secret(source: str, path: str) -> str:
    """The contents of a secret file, without trailing newlines (what ``$(< file)`` gives
    the official postgres image: the same file must give the same password here)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{source}: cannot read {path!r}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: {path!r} is not UTF-8 text") from None
    return text.rstrip("\n")


def load_config(
    environ: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
) -> Config:
    """Build the config: defaults, replaced by ``SSE_*`` variables, replaced by options.

    ``overrides`` is keyed by option name (``port``, ``certs-dir``); ``None`` values are
    ignored.  A secret setting (a password) may instead be read from a file named by
    ``SSE_<NAME>_FILE`` or ``--<name>-file``.  Raises L{ConfigError} naming the first
    setting whose value is unusable.
    """
    overrides = overrides or {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw, source = _raw_value(setting, environ, overrides)
        if setting.field == "rabbitmq_port" and raw == "":
            values[setting.field] = None
            continue
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}") from None
    if values["rabbitmq_port"] is None:
        values["rabbitmq_port"] = 5671 if values["rabbitmq_tls"] else 5672
    hosts = values["postgres_host"].count(",") + 1
    if len(values["postgres_port"]) not in (1, hosts):
        # libpq's rule: one port for every host, or one per host.
        raise ConfigError(
            f"SSE_POSTGRES_PORT: {len(values['postgres_port'])} ports for {hosts} hosts in "
            f"SSE_POSTGRES_HOST: give one port, or one per host"
        )
    values["partitions"] = _consumed_partitions(
        values["partitions"], values["rabbitmq_partitions"], environ, overrides
    )
    return Config(**values)


def _consumed_partitions(
    numbers: tuple[int, ...],
    count: int,
    environ: Mapping[str, str],
    overrides: Mapping[str, str | None],
) -> tuple[int, ...]:
    """The partitions to consume: those listed, each below the count; all when none is."""
    if not numbers:
        return tuple(range(count))
    if numbers[-1] >= count:
        source = _raw_value(_SETTINGS_BY_FIELD["partitions"], environ, overrides)[1]
        raise ConfigError(
            f"{source}: partition {numbers[-1]} does not exist with "
            f"SSE_RABBITMQ_PARTITIONS={count} (partitions 0 to {count - 1})"
        )
    return numbers


_SETTINGS_BY_FIELD = {setting.field: setting for setting in SETTINGS}
