"""The Ray layer: QueryWorker actors, the AllocatorActor and the distributed driver.

Orchestration only: every number is computed by the same ``fqa`` objects the
single-process trainer uses (``fqa.step``), so the two paths cannot drift apart.
"""

from cluster.driver import ClusterTrainer
from cluster.runtime import ClusterResourceError, connect, require_resources

__all__ = ["ClusterTrainer", "ClusterResourceError", "connect", "require_resources"]
