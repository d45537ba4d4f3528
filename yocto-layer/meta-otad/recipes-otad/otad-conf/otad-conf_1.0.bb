SUMMARY = "Configuration of the otad agent: keyring, CA, broker, slot layout"
DESCRIPTION = "Installs /etc/otad/otad.toml, the bundle keyring and the broker CA. The files \
               shipped here are EXAMPLES: integrators replace this recipe (or bbappend it) in \
               their own layer. The build warns while the example keyring or CA is installed."
SECTION = "admin"
LICENSE = "MIT"
# Configuration written for this layer; there is no upstream source tree with a license file.
# nooelint: oelint.var.licenseremotefile
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

# The partition labels come from the one shared file next to the wks layouts.
# nooelint: oelint.vars.fileextrapaths, oelint.vars.outofcontext
FILESEXTRAPATHS:prepend := "${THISDIR}/../../wic:"

SRC_URI = "\
    file://otad.toml.in \
    file://${OTAD_KEYRING_DIR} \
    file://${OTAD_CA_FILE} \
    file://otad-partitions.env \
    file://data.mount.in \
    file://boot-efi.mount.in \
"

UNPACKDIR ??= "${WORKDIR}"
S = "${UNPACKDIR}"

# Override these in your layer (bbappend, distro or local.conf). Example values in the comments.
# Example: "my-product-rev2"; must equal OTAD_BUNDLE_COMPATIBLE of your bundles.
OTAD_COMPATIBLE ?= "${MACHINE}"
# Example: "mqtt.fleet.example.net"
OTAD_BROKER_HOST ?= "broker.example.com"
OTAD_BROKER_PORT ?= "8883"
# otad's directory on the data partition: state/ (journal, lock) and identity/ (device
# certificate and key). Must match systemd/otad.service and systemd/otad.tmpfiles.
OTAD_DATA_DIR ?= "/data/otad"
# "grub" (EFI machines) or "uboot"
OTAD_BOOTLOADER ?= "grub"
# The directory of GRUB's two environment copies (grubenv.0, grubenv.1) on the mounted ESP:
# grub.cfg keeps them next to itself (its ${prefix}), which wic's bootimg-efi makes /EFI/BOOT.
# Must match otad-image.bbclass (OTAD_IMAGE_GRUB_FILES), which puts the initial copies there.
OTAD_GRUB_ENV_DIR ?= "/boot/efi/EFI/BOOT"
# Example: "\"my-app.service\", \"mosquitto.service\"" (TOML list items)
OTAD_HEALTH_REQUIRED_UNITS ?= ""
# In your layer's files/: a directory of <keyid>.pem public keys (plus an optional "revoked" file
# of key ids), and the CA certificate the broker's and the store's server certificates chain to.
OTAD_KEYRING_DIR ?= "example-keyring"
OTAD_CA_FILE ?= "example-ca.pem"
# SHA-256 of the example keyring key and example CA shipped with meta-otad: installing a file
# with one of these digests prints a build warning.
OTAD_EXAMPLE_SHA256 = "\
    eaaac5bce388d9876f9b8f1b006a7cf75e0de2f46cd0157b013ddb82d05bd926 \
    6083590a924250a29a9b113fa084b76f048a5f251b94d93effaceb54f8dc7299 \
"

FILES:${PN} += "${sysconfdir}/otad ${systemd_system_unitdir}"

# U-Boot: fw_printenv/fw_setenv, and U-Boot's default env as /etc/u-boot-initial-env (the
# agent rebuilds a lost env from it; without it a repair is refused). The package is the U-Boot
# provider's ${PN}-env: set OTAD_UBOOT_ENV_PACKAGE for a provider with another PN.
OTAD_UBOOT_ENV_PACKAGE ?= "u-boot-env"
RDEPENDS:${PN} += "${@'libubootenv-bin ' + d.getVar('OTAD_UBOOT_ENV_PACKAGE') if d.getVar('OTAD_BOOTLOADER') == 'uboot' else ''}"

# The otad recipe RDEPENDS on this virtual name, so an integrator's own config recipe can
# provide it instead (PREFERRED_RPROVIDER_virtual-otad-conf = "my-otad-conf").
RPROVIDES:${PN} += "virtual-otad-conf"

inherit allarch systemd

SYSTEMD_SERVICE:${PN} = "data.mount boot-efi.mount"

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    . ${UNPACKDIR}/otad-partitions.env
    install -d -m 0755 ${D}${sysconfdir}/otad ${D}${sysconfdir}/otad/health.d
    install -d -m 0755 ${D}${sysconfdir}/otad/keyring
    sed -e 's#@OTAD_COMPATIBLE@#${OTAD_COMPATIBLE}#g' \
        -e 's#@OTAD_DATA_DIR@#${OTAD_DATA_DIR}#g' \
        -e 's#@OTAD_BROKER_HOST@#${OTAD_BROKER_HOST}#g' \
        -e 's#@OTAD_BROKER_PORT@#${OTAD_BROKER_PORT}#g' \
        -e 's#@OTAD_PART_ROOTFS_A@#'"$OTAD_PART_ROOTFS_A"'#g' \
        -e 's#@OTAD_PART_ROOTFS_B@#'"$OTAD_PART_ROOTFS_B"'#g' \
        -e 's#@OTAD_BOOTLOADER@#${OTAD_BOOTLOADER}#g' \
        -e 's#@OTAD_GRUB_ENV_DIR@#${OTAD_GRUB_ENV_DIR}#g' \
        -e 's#@OTAD_HEALTH_REQUIRED_UNITS@#${OTAD_HEALTH_REQUIRED_UNITS}#g' \
        ${UNPACKDIR}/otad.toml.in > ${D}${sysconfdir}/otad/otad.toml
    chmod 0644 ${D}${sysconfdir}/otad/otad.toml
    install -d ${D}${systemd_system_unitdir}
    for unit in data.mount boot-efi.mount; do
        sed -e 's#@OTAD_PART_DATA@#'"$OTAD_PART_DATA"'#g' \
            -e 's#@OTAD_PART_ESP@#'"$OTAD_PART_ESP"'#g' \
            ${UNPACKDIR}/$unit.in > ${D}${systemd_system_unitdir}/$unit
        chmod 0644 ${D}${systemd_system_unitdir}/$unit
    done
    install -m 0644 ${UNPACKDIR}/${OTAD_KEYRING_DIR}/*.pem ${D}${sysconfdir}/otad/keyring/
    if [ -e ${UNPACKDIR}/${OTAD_KEYRING_DIR}/revoked ]; then
        install -m 0644 ${UNPACKDIR}/${OTAD_KEYRING_DIR}/revoked ${D}${sysconfdir}/otad/keyring/
    fi
    install -m 0644 ${UNPACKDIR}/${OTAD_CA_FILE} ${D}${sysconfdir}/otad/ca.pem

    for f in ${D}${sysconfdir}/otad/keyring/*.pem ${D}${sysconfdir}/otad/ca.pem; do
        sum=$(sha256sum "$f" | cut -d' ' -f1)
        for example in ${OTAD_EXAMPLE_SHA256}; do
            if [ "$sum" = "$example" ]; then
                bbwarn "otad-conf: $(basename $f) is the EXAMPLE shipped with meta-otad. Devices built like this accept bundles signed with a key that is public in the otad repository, or trust an example CA. Provide your own keyring and CA (see docs/yocto.md, 'Keys')."
            fi
        done
    done
}

CONFFILES:${PN} += "${sysconfdir}/otad/otad.toml"

# Device configuration: no CVE product of its own.
CVE_PRODUCT = ""
