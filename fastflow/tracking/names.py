"""The names a run gives MLflow entities, checked before any work with MLflow's own validators.

- registered model: `fastflow-<category>` (`model_name`), checked with MLflow's registered-model rule;
- logged model: `<category>-<run name>` (`logged_model_name`), derived: each run of characters other than
  ASCII letters, digits, '_' and '-' becomes one '-' (MLflow's logged-model names may not hold '/', ':', '.',
  '%' or quotes), so a category folder such as `tire.v2` logs its models as `tire-v2-<run name>`;
- experiment: `tracking.experiment`, checked with MLflow's experiment-name rule.

`check_names` raises one `ConfigError` line naming the key, its value and MLflow's rule, before a model is
built or a run exists (train, each sweep before its first trial); a category that is not one folder directly
inside `data.root` (`../outside/tirex`) is refused the same way (`preflight.category_problem`).
"""

from __future__ import annotations

import re

from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_experiment_name, _validate_logged_model_name, _validate_model_name

from fastflow.runtime.config import ConfigError
from fastflow.runtime.faults import first_sentence
from fastflow.runtime.preflight import category_problem


def model_name(category: str) -> str:
    """The registered model of a category."""
    return f"fastflow-{category}"


def logged_model_name(category: str, run_name: str) -> str:
    """`<category>-<run name>` (e.g. `synthetic-trial-003`) in the characters MLflow allows in a logged model's
    name (see the module's docstring)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{category}-{run_name}").strip("-") or "model"


def _mlflow_rule(validate, name: str) -> str:
    """MLflow's message when `validate(name)` refuses `name`, else ''."""
    try:
        validate(name)
    except MlflowException as error:
        return " ".join(str(error.message).split())
    return ""


def check_names(category: str, experiment: str, run_name: str = "") -> None:
    """Raise one `ConfigError` line when `category` or `experiment` cannot name what MLflow will store."""
    problem = category_problem(category)
    if problem:
        raise ConfigError(f"data.category={category!r} is invalid; expected {problem}")
    for validate, name in ((_validate_model_name, model_name(category)),
                           (_validate_logged_model_name, logged_model_name(category, run_name or "run"))):
        rule = _mlflow_rule(validate, name)
        if rule:
            raise ConfigError(f"data.category={category!r} cannot name the MLflow model {name!r}: {rule} "
                              "Rename the category's folder")
    rule = _mlflow_rule(_validate_experiment_name, experiment)
    if rule:
        raise ConfigError(f"tracking.experiment={experiment!r} is invalid: {first_sentence(rule)}")


__all__ = ["model_name", "logged_model_name", "check_names"]
