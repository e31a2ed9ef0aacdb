"""fleetnest ota (built by later issues)."""
