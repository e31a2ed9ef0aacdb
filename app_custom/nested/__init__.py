"""The nested learning core: levels, multi-frequency schedule, slow deltas, reference models.

Nothing here imports FLARE, MQTT or HTTP: the same core runs in a FLARE executor, as a
hierarchical learner and inside the edge daemon.
"""
