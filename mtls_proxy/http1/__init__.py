"""PURE. HTTP/1.1 without I/O: request validation, response heads and body framing, WebSocket
upgrades."""
