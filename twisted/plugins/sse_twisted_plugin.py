"""Registers ``twistd sse-server``; imports nothing heavy while twistd scans plugins."""

from twisted.application.service import ServiceMaker

sse_server = ServiceMaker(
    "sse-twisted",
    "sse_twisted.tap",
    "Server-Sent Events fed from RabbitMQ, authenticated against PostgreSQL",
    "sse-server",
)
