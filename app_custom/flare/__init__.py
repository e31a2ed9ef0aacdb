"""Thin NVFlare components over the core: learner executor, outbound guard, nested controller."""
