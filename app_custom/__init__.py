"""fleetnest learning core (plain Python + torch) and the thin FLARE components that adapt it."""
