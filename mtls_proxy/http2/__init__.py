"""PURE. HTTP/2 without I/O: request header blocks checked and translated for the shared
request rules (http1.request.prepare)."""
