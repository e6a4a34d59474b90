"""Local cluster launcher: the LocalCluster behind `moe up/down/status`, also used by tests and benchmarks."""

from services.launcher.cluster import ClusterError, LocalCluster, ManagedProcess

__all__ = ["ClusterError", "LocalCluster", "ManagedProcess"]
