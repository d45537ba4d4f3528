# With DISTRO_FEATURES "otad" (the ":otad" override, conf/layer.conf): grub-bootconf installs
# otad's A/B grub.cfg (boot/grub/grub.cfg of the otad repository, the same file the QEMU images
# boot) instead of the generated one. This covers images that put GRUB's files in place through
# packages (EFI_PROVIDER = "grub-efi" with grub-bootconf); wic images get the same file from the
# wks (wic/otad-grub.cfg). Without the feature this bbappend changes nothing.

FILESEXTRAPATHS:prepend:otad := "${THISDIR}/../../../../boot/grub:"
SRC_URI:append:otad = " file://grub.cfg"

do_install:append:otad() {
    install -m 0644 ${@d.getVar('UNPACKDIR') or d.getVar('WORKDIR')}/grub.cfg ${D}${EFI_FILES_PATH}/grub.cfg
}
