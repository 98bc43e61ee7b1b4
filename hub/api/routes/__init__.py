"""One router per noun, mounted under ``/api/v1`` by ``hub.api.app``."""
