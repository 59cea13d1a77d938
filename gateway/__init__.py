"""Public KServe v2 front door of the mesh: auth, version resolution, worker choice, coalescing, failover."""
