"""Forward gradient estimators, registered by name (``create_estimator``, ``list_estimators``)."""

from fqa.estimators.base import Estimator, Shard, ShardResult, Update  # noqa: E402
from fqa.registry import Registry

ESTIMATORS: Registry[Estimator] = Registry("estimator")

from fqa.estimators import lr, spsa  # noqa: E402,F401  (registration)


def create_estimator(name: str, **kwargs) -> Estimator:
    return ESTIMATORS.create(name, **kwargs)


def list_estimators() -> list[str]:
    return ESTIMATORS.names()


__all__ = [
    "ESTIMATORS",
    "Estimator",
    "Shard",
    "ShardResult",
    "Update",
    "create_estimator",
    "list_estimators",
]
