"""Serve: a trained model in use (the Predictor, `fastflow predict`, export, the MLflow pyfunc model).
May import every layer below: runtime, data, core, engine, pages and tracking."""
