"""One client connection: the TLS layer, admission, the HTTP/1.1 protocol, exchanges, the
upstream pool."""
