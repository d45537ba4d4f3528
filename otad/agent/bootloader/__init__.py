"""Bootloader env codecs (pure) and one backend per bootloader (grub, uboot, sim)."""

__layer__ = "pure"
