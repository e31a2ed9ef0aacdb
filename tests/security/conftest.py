"""The OTA tests' fixtures (a cluster archive, a release bundle, a real Mosquitto), shared."""

from tests.ota.conftest import Mosquitto, archive, bundle, mosquitto  # noqa: F401
