# otad-image.bbclass: makes an image recipe an otad A/B image.
#
#     inherit otad-image          (in your image recipe; see recipes-otad/images/)
#
# - installs the otad agent (with otad-conf) and the kernel into the rootfs, so the kernel is
#   updated together with its slot;
# - produces the wic disk image to flash once and the ext4 file system image that
#   otad-bundle.bbclass signs for every later update;
# - with DISTRO_FEATURES "otad": on EFI machines, puts the initial GRUB environment and
#   otad-local.cfg (recipe otad-grubenv) next to grub.cfg on the ESP; on other machines, puts
#   boot.scr (recipe otad-uboot) on the boot partition, and otad-ab-uboot.wks places the
#   initial U-Boot environment copies.
#
# Variables:
# OTAD_IMAGE_SLOT_KIB  Size of a rootfs slot in KiB (the wks files' --fixed-size). A rootfs that
#                      does not fit fails the build instead of an update in the field.
#                      Example: "2097152"

OTAD_IMAGE_SLOT_KIB ??= "2097152"

IMAGE_INSTALL:append = " otad kernel-image"
IMAGE_FSTYPES:append = " ext4 wic"
WKS_FILE ?= "${@bb.utils.contains('MACHINE_FEATURES', 'efi', 'otad-ab-grub-efi.wks', 'otad-ab-uboot.wks', d)}"
IMAGE_ROOTFS_MAXSIZE ?= "${OTAD_IMAGE_SLOT_KIB}"

OTAD_IMAGE_GRUB_FILES = "otad-grub/grubenv.0;EFI/BOOT/grubenv.0 otad-grub/grubenv.1;EFI/BOOT/grubenv.1 otad-grub/otad-local.cfg;EFI/BOOT/otad-local.cfg"
IMAGE_EFI_BOOT_FILES:append:otad = " ${@bb.utils.contains('MACHINE_FEATURES', 'efi', d.getVar('OTAD_IMAGE_GRUB_FILES'), '', d)}"
OTAD_IMAGE_UBOOT_FILES = "otad-uboot/boot.scr;boot.scr"
IMAGE_BOOT_FILES:append:otad = " ${@bb.utils.contains('MACHINE_FEATURES', 'efi', '', d.getVar('OTAD_IMAGE_UBOOT_FILES'), d)}"
do_image_wic[depends] += "${@bb.utils.contains('DISTRO_FEATURES', 'otad', bb.utils.contains('MACHINE_FEATURES', 'efi', 'otad-grubenv:do_deploy', 'otad-uboot:do_deploy', d), '', d)}"
