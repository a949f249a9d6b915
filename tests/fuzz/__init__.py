"""Differential request-smuggling fuzzer: generated streams through the proxy to real upstreams."""
