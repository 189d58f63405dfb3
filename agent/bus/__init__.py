"""AMQP bus: envelope, transport, RPC, orchestrator client (later issues)."""
