"""The backend: device state replica, artifact store, rollouts, PKI."""

__layer__ = "pure"
