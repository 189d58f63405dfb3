"""Durable claim ledger and true host state (topology - usage - claims)."""
