"""Core: the model and its maths (backbone, flow, loss, anomaly map, image scores, metrics, EMA), no I/O.
May import runtime and data."""
