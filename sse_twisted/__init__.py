"""sse-twisted: Server-Sent Events fed from RabbitMQ, authenticated against PostgreSQL."""

__version__ = "0.1.0"
