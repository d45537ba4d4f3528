# With DISTRO_FEATURES "otad" (the ":otad" override, conf/layer.conf): build into GRUB's EFI image
# the modules boot/grub/grub.cfg needs beyond oe-core's default GRUB_BUILDIN. wic's bootimg-efi
# copies no module directory to the ESP, so a command that is not built in is an "unknown
# command" at boot; without `reboot`, a slot whose kernel fails to load would wait at the grub>
# prompt instead of falling back. tests/integration_files derives this list from grub.cfg with
# GRUB's own command.lst. Without the feature this bbappend changes nothing.

GRUB_BUILDIN:append:otad = " echo reboot sleep terminal"
