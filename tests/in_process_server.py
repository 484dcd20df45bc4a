"""An sse-twisted server running in the test process, on the test reactor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.protocols.policies import ProtocolWrapper

from sse_twisted._config import Config, load_config
from sse_twisted.tap import SSEService, build_service
from tests.waiting import bounded, wait_for


def socket_transport(transport: Any) -> Any:
    """The TCP transport under the TLS and connection-tracking wrappers of a connection."""
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    return transport


@dataclass
class RunningServer:
    """An in-process server: its config, service tree, the port it bound and fatal errors."""

    config: Config
    service: SSEService
    port: int
    fatal: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        """Where a browser reaches it."""
        return f"https://localhost:{self.port}"

    def subscribe_url(self, topic: str, userid: str, nonce: str) -> str:
        """The URL a browser's EventSource would open."""
        return f"{self.base_url}/subscribe/{topic}/{userid}/{nonce}"

    async def stop(self) -> None:
        """Stop every service; open streams are closed, and so is the daily log file
        (twistd's process exit closes it; a server in the test process must)."""
        await self.service.stopService()
        self.service.log_observer.close()


async def start_server(environ: Mapping[str, str], consuming: bool = True) -> RunningServer:
    """Start a server on a free port with ``environ`` as its SSE_* settings; wait until it
    listens and (unless ``consuming`` is false: a consumer that is to be refused) consumes."""
    config = load_config(
        {"SSE_PORT": "0", "SSE_LISTEN_ADDRESS": "127.0.0.1", "SSE_METRICS_PORT": "0", **environ}
    )
    fatal: list[str] = []
    service = build_service(config, reactor, on_fatal=fatal.append)
    service.startService()
    port = await bounded(service.listener.listening)
    running = RunningServer(config, service, port.getHost().port, fatal)
    if consuming:
        await wait_for(lambda: service.consumer.consuming, "consumer never started")
    return running
