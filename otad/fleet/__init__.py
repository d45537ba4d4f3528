"""Simulated devices: many real agents in one process, for demos and fleet-scale tests."""

__layer__ = "pure"
