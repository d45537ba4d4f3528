SUMMARY = "Initial otad GRUB environment and local GRUB settings for the ESP"
DESCRIPTION = "Deploys grubenv.0/grubenv.1 (both slots good, A first) written by the otad agent's \
               own GRUB backend, and otad-local.cfg (kernel path, console) that boot/grub/grub.cfg \
               sources. otad-image.bbclass copies them next to grub.cfg on the ESP."
SECTION = "bootloaders"
LICENSE = "MIT"
# Files written for this layer; there is no upstream source tree with a license file.
# nooelint: oelint.var.licenseremotefile
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

DEPENDS = "otad-native"

SRC_URI = "file://otad-initial-grubenv.py"

UNPACKDIR ??= "${WORKDIR}"
S = "${UNPACKDIR}"

# The kernel inside each slot (otad-image installs kernel-image into the rootfs) and the console.
OTAD_GRUB_KERNEL ?= "/boot/${KERNEL_IMAGETYPE}"
OTAD_GRUB_CONSOLE ?= "ttyS0,115200"

inherit deploy nopackages python3native

do_configure[noexec] = "1"

do_compile() {
    nativepython3 ${S}/otad-initial-grubenv.py ${B}/env \
        ${@'' if d.getVar('INITRAMFS_IMAGE') else '--no-initrd'}
    printf 'set otad_kernel=%s\nset otad_console=%s\n' '${OTAD_GRUB_KERNEL}' '${OTAD_GRUB_CONSOLE}' \
        > ${B}/env/otad-local.cfg
}

do_install[noexec] = "1"

do_deploy() {
    install -d ${DEPLOYDIR}/otad-grub
    install -m 0644 ${B}/env/grubenv.0 ${B}/env/grubenv.1 ${B}/env/otad-local.cfg ${DEPLOYDIR}/otad-grub/
}
addtask deploy after do_compile before do_build
