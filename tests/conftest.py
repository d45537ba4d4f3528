"""Shared fixtures live in tests/plugins/ (one module per area), registered here."""

pytest_plugins = ["plugins.cloud_env", "plugins.agent_env"]
