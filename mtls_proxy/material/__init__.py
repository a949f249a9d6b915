"""Certificates, keys, CA bundles and CRLs: loaded, validated, verified, and built into one
Generation."""
