# otad-bundle.bbclass: turns an image's rootfs file system image into a signed otad bundle
# (.otab) with `otad bundle create`, run from otad-native on the build host.
#
# Use it from a bundle recipe of your own (recipes-otad/bundles/otad-reference-bundle.bb is one):
#
#     inherit otad-bundle
#     OTAD_BUNDLE_IMAGE = "core-image-minimal"
#     OTAD_BUNDLE_KEY = "/secure/keys/bundle-signing.pem"
#
# and build it with `bitbake <bundle recipe>`; the bundle lands in DEPLOY_DIR_IMAGE as
# ${OTAD_BUNDLE_NAME}.otab. The device accepts it when its keyring (otad-conf) holds the public half
# of OTAD_BUNDLE_KEY and its `compatible` equals OTAD_BUNDLE_COMPATIBLE.
#
# Variables (defaults below; tests/integration_files runs `otad bundle create` with exactly the
# command line otad_bundle_argv() builds from these defaults):
#
# OTAD_BUNDLE_IMAGE             Required. The image recipe whose rootfs becomes the payload.
#                               Example: "core-image-minimal"
# OTAD_BUNDLE_FSTYPE            Which of the image's IMAGE_FSTYPES is the payload; it must be a
#                               file system image that fits a rootfs slot (see the wks files).
#                               Example: "ext4"
# OTAD_BUNDLE_IMAGE_FILE        The payload file. Default: the image's deploy symlink.
#                               Example: "${DEPLOY_DIR_IMAGE}/core-image-minimal-qemux86-64.rootfs.ext4"
# OTAD_BUNDLE_VERSION           The software version devices report after installing the bundle.
#                               Example: "2.3.1"
# OTAD_BUNDLE_COMPATIBLE        Hardware/product string; must equal otad-conf's OTAD_COMPATIBLE.
#                               Example: "my-product-rev2"
# OTAD_BUNDLE_KEY               Required. Signing key(s), PEM (Ed25519 or ECDSA P-256); several
#                               paths separated by spaces sign with each (key rotation).
#                               Example: "/secure/keys/bundle-2026.pem /secure/keys/bundle-2027.pem"
# OTAD_BUNDLE_SECURITY_VERSION  Anti-rollback counter: devices refuse bundles whose security version
#                               is lower than the one they run. Raise it with every security fix.
#                               Example: "4"
# OTAD_BUNDLE_COMPRESSION       Payload compression: "zstd" or "none".
#                               Example: "zstd"
# OTAD_BUNDLE_LEVEL             zstd level 1..19 (ignored with "none").
#                               Example: "19"
# OTAD_BUNDLE_EXPIRES           Optional ISO 8601 time after which devices refuse the bundle.
#                               Example: "2027-06-30T00:00:00Z"
# OTAD_BUNDLE_DEVICE            Optional device id: only that device accepts the bundle.
#                               Example: "dev-000123"
# OTAD_BUNDLE_NAME              Output file name without ".otab".
#                               Example: "my-product-2.3.1"
# OTAD_BUNDLE_EXAMPLE_KEY_SHA256  SHA-256 of meta-otad's example signing key: signing with it
#                               prints a build warning (the key is public in the otad repository).

OTAD_BUNDLE_IMAGE ??= ""
OTAD_BUNDLE_FSTYPE ??= "ext4"
OTAD_BUNDLE_IMAGE_FILE ??= "${DEPLOY_DIR_IMAGE}/${OTAD_BUNDLE_IMAGE}-${MACHINE}.rootfs.${OTAD_BUNDLE_FSTYPE}"
OTAD_BUNDLE_VERSION ??= "${DISTRO_VERSION}"
OTAD_BUNDLE_COMPATIBLE ??= "${MACHINE}"
OTAD_BUNDLE_KEY ??= ""
OTAD_BUNDLE_SECURITY_VERSION ??= "0"
OTAD_BUNDLE_COMPRESSION ??= "zstd"
OTAD_BUNDLE_LEVEL ??= "3"
OTAD_BUNDLE_EXPIRES ??= ""
OTAD_BUNDLE_DEVICE ??= ""
OTAD_BUNDLE_NAME ??= "${PN}-${MACHINE}"
OTAD_BUNDLE_EXAMPLE_KEY_SHA256 = "37fd89760e2ddc37f45974be80cc73acb6298632ed27e1b7b0461affcaba7bf4"

inherit deploy nopackages python3native

# otad-native provides the `otad` command in the recipe's native sysroot; python3native the
# Python it runs on (nativepython3).
DEPENDS += "otad-native"

# A bundle has no source of its own: everything before the bundle task is a no-op.
SRC_URI = ""
do_fetch[noexec] = "1"
do_unpack[noexec] = "1"
do_patch[noexec] = "1"
do_configure[noexec] = "1"
do_compile[noexec] = "1"
do_install[noexec] = "1"
deltask do_populate_sysroot

# Parse-time checks give a clear error before any task runs, and the task dependency on the
# image's do_image_complete can only be added once OTAD_BUNDLE_IMAGE is known to be set.
# nooelint: oelint.task.noanonpython
python __anonymous() {
    image = d.getVar("OTAD_BUNDLE_IMAGE")
    if not image:
        bb.fatal("otad-bundle: %s: set OTAD_BUNDLE_IMAGE to the image recipe to bundle" % d.getVar("PN"))
    if not d.getVar("OTAD_BUNDLE_KEY"):
        bb.fatal("otad-bundle: %s: set OTAD_BUNDLE_KEY to the signing key (PEM path)" % d.getVar("PN"))
    if d.getVar("OTAD_BUNDLE_COMPRESSION") not in ("zstd", "none"):
        bb.fatal("otad-bundle: OTAD_BUNDLE_COMPRESSION must be zstd or none, not %r" % d.getVar("OTAD_BUNDLE_COMPRESSION"))
    # The payload is the image's deploy output: rebuild the bundle whenever the image changes.
    d.appendVarFlag("do_otad_bundle", "depends", " %s:do_image_complete" % image)
    # Re-sign when a key file changes (the path alone would not change the task signature).
    for key in d.getVar("OTAD_BUNDLE_KEY").split():
        d.appendVarFlag("do_otad_bundle", "file-checksums", " %s:True" % key)
}

def otad_bundle_argv(d):
    """The `otad bundle create` command line built from the OTAD_BUNDLE_* variables."""
    import os
    argv = [
        "otad", "bundle", "create",
        "--image", d.getVar("OTAD_BUNDLE_IMAGE_FILE"),
        "--version", d.getVar("OTAD_BUNDLE_VERSION"),
        "--compatible", d.getVar("OTAD_BUNDLE_COMPATIBLE"),
    ]
    for key in d.getVar("OTAD_BUNDLE_KEY").split():
        argv += ["--key", key]
    argv += [
        "-o", os.path.join(d.getVar("B"), d.getVar("OTAD_BUNDLE_NAME") + ".otab"),
        "--security-version", d.getVar("OTAD_BUNDLE_SECURITY_VERSION"),
        "--compression", d.getVar("OTAD_BUNDLE_COMPRESSION"),
        "--level", d.getVar("OTAD_BUNDLE_LEVEL"),
    ]
    for var, flag in (("OTAD_BUNDLE_EXPIRES", "--expires"), ("OTAD_BUNDLE_DEVICE", "--device")):
        value = d.getVar(var)
        if value:
            argv += [flag, value]
    return argv

python do_otad_bundle() {
    import hashlib
    import subprocess

    example = d.getVar("OTAD_BUNDLE_EXAMPLE_KEY_SHA256")
    for key in d.getVar("OTAD_BUNDLE_KEY").split():
        with open(key, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == example:
                bb.warn("otad-bundle: %s is meta-otad's EXAMPLE signing key, public in the otad "
                        "repository: anyone can sign bundles your devices accept. See docs/yocto.md, "
                        "'Keys'." % key)
    argv = otad_bundle_argv(d)
    bb.note("otad-bundle: running %s" % " ".join(argv))
    env = dict(os.environ, PATH=d.getVar("PATH"))
    result = subprocess.run(argv, env=env, cwd=d.getVar("B"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, check=False)
    if result.returncode != 0:
        bb.fatal("otad-bundle: `otad bundle create` failed (exit %d):\n%s" % (result.returncode, result.stdout))
    bb.note(result.stdout)
}
do_otad_bundle[doc] = "Builds and signs the otad bundle from the image named by OTAD_BUNDLE_IMAGE"
do_otad_bundle[dirs] = "${B}"
do_otad_bundle[cleandirs] = "${B}"
addtask otad_bundle after do_prepare_recipe_sysroot before do_deploy

do_deploy() {
    install -m 0644 ${B}/${OTAD_BUNDLE_NAME}.otab ${DEPLOYDIR}/${OTAD_BUNDLE_NAME}.otab
}
addtask deploy after do_otad_bundle before do_build
