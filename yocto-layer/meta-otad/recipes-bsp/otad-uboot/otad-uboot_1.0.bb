SUMMARY = "otad U-Boot boot script and initial redundant environment"
DESCRIPTION = "Compiles boot/u-boot/boot.cmd of the otad repository into boot.scr and writes the \
               initial environment copies that boot/u-boot/fw_env.config names (U-Boot's default \
               environment plus both slots with their full boot attempts, A first) with the otad \
               agent's own U-Boot backend. \
               otad-image.bbclass puts boot.scr on the boot partition; otad-ab-uboot.wks places \
               the environment copies."
SECTION = "bootloaders"
LICENSE = "MIT"
# Files written for this layer and the repository's own; no upstream tree with a license file.
# nooelint: oelint.var.licenseremotefile
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

DEPENDS = "otad-native u-boot-mkimage-native"

# The boot script and fw_env.config are the repository's boot/u-boot/ files (the same files the
# QEMU tests and the U-Boot bbappend use), not copies.
# nooelint: oelint.vars.fileextrapaths, oelint.vars.outofcontext
FILESEXTRAPATHS:prepend := "${THISDIR}/../../../../boot/u-boot:"
SRC_URI = "\
    file://boot.cmd \
    file://fw_env.config \
    file://otad-initial-ubootenv.py \
"

UNPACKDIR ??= "${WORKDIR}"
S = "${UNPACKDIR}"

inherit deploy nopackages kernel-arch python3native

# U-Boot's default environment as text, which u-boot.inc deploys as ${UBOOT_INITIAL_ENV}
# (default "${PN}-initial-env" of the U-Boot recipe: u-boot-initial-env). The factory env starts
# from it: U-Boot uses a stored env with a valid CRC instead of its built-in default, so an env
# holding only otad's variables would lack bootcmd and stop U-Boot at its prompt.
# Set another file here for a U-Boot provider with another PN (e.g. u-boot-imx-initial-env).
OTAD_UBOOT_INITIAL_ENV ?= "${DEPLOY_DIR_IMAGE}/u-boot-initial-env"
do_compile[depends] += "virtual/bootloader:do_deploy"

do_configure[noexec] = "1"

do_compile() {
    uboot-mkimage -A ${UBOOT_ARCH} -T script -C none -n "otad A/B" -d ${S}/boot.cmd ${B}/boot.scr
    nativepython3 ${S}/otad-initial-ubootenv.py ${S}/fw_env.config ${OTAD_UBOOT_INITIAL_ENV} ${B}/env
}

do_install[noexec] = "1"

do_deploy() {
    install -d ${DEPLOYDIR}/otad-uboot
    install -m 0644 ${B}/boot.scr ${B}/env/copy*.bin ${B}/env/offsets ${DEPLOYDIR}/otad-uboot/
}
addtask deploy after do_compile before do_build
