"""The commands: serve, check, explain, demo, pki."""
