"""fleetnest provisioning (built by later issues)."""
