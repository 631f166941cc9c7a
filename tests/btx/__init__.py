"""The old btx server and client, as btx writes them, for compatibility tests."""
