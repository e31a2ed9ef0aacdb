"""fleetnest ota: releases, their signed repository and server, rollouts, fleet messaging, the device updater."""
