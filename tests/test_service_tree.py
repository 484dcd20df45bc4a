"""The service tree ``tap.build_service`` assembles: which subsystems run, in what order."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import reactor

from sse_twisted._config import load_config
from sse_twisted._limits import OpenFileLimit
from sse_twisted.tap import SSEService, build_service

# Backends first, so that the first browser finds them connecting; the listener before the
# rest, and stopped first (by the drain).
SERVER_CHILDREN = [
    "authenticator",
    "consumer",
    "listener",
    "revocation-enforcer",
    "revocations",
    "stream-lifetime",
    "heartbeats",
    "stalls",
    "metrics",
]


def unstarted_server(certs_dir: Path, open_files: OpenFileLimit | None = None) -> SSEService:
    config = load_config({"SSE_CERTS_DIR": str(certs_dir), "SSE_METRICS_PORT": "9464"})
    return build_service(config, reactor, on_fatal=pytest.fail, open_files=open_files)


def test_the_tree_starts_the_backends_then_the_listener_and_names_each_subsystem(
    certs_dir: Path,
) -> None:
    service = unstarted_server(certs_dir)
    assert [child.name for child in service] == SERVER_CHILDREN
    assert service.getServiceNamed("listener") is service.listener
    assert service.getServiceNamed("consumer") is service.consumer


def test_only_the_process_own_server_reloads_on_sighup_and_reports_descriptor_shortages(
    certs_dir: Path,
) -> None:
    service = unstarted_server(certs_dir, OpenFileLimit(before=1024, soft=4096, hard=4096))
    assert [child.name for child in service] == [
        *SERVER_CHILDREN,
        "certificate-reload",
        "descriptor-warnings",
    ]
