"""Fixtures for the device agent: file-backed slots, sim bootloader, agent runs."""
