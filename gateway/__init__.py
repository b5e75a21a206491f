"""realtime-gateway: a multi-tenant WebSocket gateway for the OpenAI Realtime API."""

__version__ = "0.1.0"
