"""Local cluster launcher: `moe up/down/status` and the LocalCluster API used by tests and benchmarks."""

from services.launcher.cluster import ClusterError, LocalCluster, ManagedProcess

__all__ = ["ClusterError", "LocalCluster", "ManagedProcess"]
