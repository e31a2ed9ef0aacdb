"""fleetnest provisioning: fleet description -> FLARE project and startup kits, device identities,
certificate rotation and revocation (``fleetnest provision``)."""
