"""Prometheus metrics and the JSON/text logs."""
