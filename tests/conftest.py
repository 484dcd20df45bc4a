"""Shared fixtures: the real TLS backends (started once per session, on first use)."""

from tests.conftest_backends import pki, postgres_tls, rabbitmq_tls

__all__ = ["pki", "postgres_tls", "rabbitmq_tls"]
