"""fleetnest edge_runtime (built by later issues)."""
