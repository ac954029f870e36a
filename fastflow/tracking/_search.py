"""Plumbing of the tracking layer: MLflow's run search, page after page."""

from __future__ import annotations

from mlflow.tracking import MlflowClient


def all_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list:
    """Every run of `experiment_ids` that matches `filter_string` (MLflow search syntax), page after page (a search
    returns at most 1000 runs), one search per 100 experiments (a tracking server's limit)."""
    runs = []
    for start in range(0, len(experiment_ids), 100):
        token = None
        while True:
            page = client.search_runs(experiment_ids[start:start + 100], filter_string, max_results=1000,
                                      page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                break
    return runs
