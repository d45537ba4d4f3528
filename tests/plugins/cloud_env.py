"""Fixtures for the cloud side: PKI, a real Mosquitto with TLS and ACL, replica, store."""
