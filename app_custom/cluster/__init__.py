"""Cluster-side core: slow-delta aggregation, the validation gate, the version archive (no FLARE imports)."""
