"""PURE. The decisions: configuration, identity, policy, headers, paths, errors. No I/O."""
