# Inherited globally by conf/layer.conf. The GRUB and U-Boot integration of this layer only acts
# when DISTRO_FEATURES contains "otad"; adding the layer alone changes nothing. Say so once per
# build, so that a missing flag is not discovered on a device that cannot roll back.
#
# Silence the warning with OTAD_SANITY_SKIP = "1" (e.g. in a build that only needs otad-native).

OTAD_SANITY_SKIP ??= "0"

addhandler otad_sanity_check
otad_sanity_check[eventmask] = "bb.event.SanityCheck"
otad_sanity_check[doc] = "Warns when meta-otad is used without the otad distro feature"

python otad_sanity_check() {
    if d.getVar("OTAD_SANITY_SKIP") == "1":
        return
    if bb.utils.contains("DISTRO_FEATURES", "otad", True, False, d):
        if not bb.utils.contains("DISTRO_FEATURES", "systemd", True, False, d):
            bb.warn("meta-otad: DISTRO_FEATURES has 'otad' but not 'systemd': the agent, its "
                    "watchdog and the post-boot health check are systemd units.")
        return
    bb.warn("meta-otad is in BBLAYERS but 'otad' is not in DISTRO_FEATURES: the A/B boot "
            "integration (GRUB config, U-Boot script, fw_env.config) is disabled. Add "
            "DISTRO_FEATURES:append = \" otad\" to your distro config, or set "
            "OTAD_SANITY_SKIP = \"1\" to silence this warning.")
}
