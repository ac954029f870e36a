"""Runtime: the config tree, preflight checks, faults of stores as one line, secret redaction, signals and safe
checkpoint loading. The bottom layer: imports no other part of fastflow."""
