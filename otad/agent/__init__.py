"""The device agent: everything that runs on the device."""

__layer__ = "pure"
