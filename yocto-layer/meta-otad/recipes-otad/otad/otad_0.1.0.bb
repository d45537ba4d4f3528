SUMMARY = "otad: over-the-air A/B update agent and bundle tool"
DESCRIPTION = "The otad device agent (follows the device shadow over MQTT, streams signed \
               bundles over HTTPS into the inactive rootfs slot, switches GRUB or U-Boot and \
               confirms or rolls back after the reboot), its systemd units, and the otad bundle \
               tool (native variant) that signs bundles on the build host."
SECTION = "admin"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://LICENSE;md5=c738517615babe8e9b976b162b171707"

# The layer lives in the otad repository: build the package from the same checkout, so the
# recipe's version and the package's version cannot drift (PV here = version in pyproject.toml,
# checked by tests/integration_files).
# nooelint: oelint.vars.fileextrapaths, oelint.vars.outofcontext
FILESEXTRAPATHS:prepend := "${THISDIR}/../../../..:"
SRC_URI = "\
    file://LICENSE;subdir=otad-src \
    file://pyproject.toml;subdir=otad-src \
    file://README.md;subdir=otad-src \
    file://otad;subdir=otad-src \
    file://systemd;subdir=otad-src \
"

UNPACKDIR ??= "${WORKDIR}"
S = "${UNPACKDIR}/otad-src"

inherit python_setuptools_build_meta systemd

FILES:${PN}:append:class-target = " ${systemd_system_unitdir} ${nonarch_libdir}/tmpfiles.d"

# The device agent. python3-modules: otad uses asyncio, ssl, tomllib, json, hashlib, fcntl,
# sqlite3 (cloud side) and more of the standard library; trim to single python3-<module>
# packages if image size matters more than the risk of an ImportError on a device.
# python3-aiohttp is left out: only the cloud side (`otad cloud ...`) uses it, and without it
# those commands end with a one-line error naming it. So is python3-cryptography: the agent
# checks signatures with the libcrypto Python's ssl module uses, and only making keys and
# signing bundles (`otad bundle keygen|create`, never done on a device) needs it.
# tests/integration_files runs the agent through a whole update with every library outside
# this list unimportable.
# python3-cffi: zstandard's cffi backend, which decodes straight into the agent's buffers;
# without it the agent falls back to a decoder about 13 times slower.
RDEPENDS:${PN}:class-target = "\
    python3-aiomqtt \
    python3-cffi \
    python3-modules \
    python3-pyudev \
    python3-rich \
    python3-structlog \
    python3-zstandard \
    virtual-otad-conf \
"
# The bundle tool on the build host needs only what `otad bundle ...` imports (the CLI loads the
# agent's and the cloud's libraries only inside their own commands). tests/integration_files runs
# `otad bundle create` with every other library blocked, so this list cannot silently fall short.
RDEPENDS:${PN}:class-native = "\
    python3-cryptography-native \
    python3-rich-native \
    python3-structlog-native \
    python3-zstandard-native \
"

SYSTEMD_SERVICE:${PN} = "otad.service otad-health.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append:class-target() {
    install -d ${D}${systemd_system_unitdir}
    for unit in otad.service otad-health.service; do
        sed -e 's#/usr/bin/otad#${bindir}/otad#g' ${S}/systemd/$unit > ${D}${systemd_system_unitdir}/$unit
        chmod 0644 ${D}${systemd_system_unitdir}/$unit
    done
    install -D -m 0644 ${S}/systemd/otad.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/otad.conf
}

CVE_PRODUCT = "otad"

BBCLASSEXTEND = "native"
