"""The signed otad bundle format: build, sign, inspect, streaming verify (pure)."""

__layer__ = "pure"
