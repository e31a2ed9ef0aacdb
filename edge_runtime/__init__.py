"""fleetnest edge_runtime: the device daemon (inference, continual learning, the fleet client, OTA glue)."""
