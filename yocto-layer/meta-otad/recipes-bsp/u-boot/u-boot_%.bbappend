# With DISTRO_FEATURES "otad" (the ":otad" override, conf/layer.conf): U-Boot's recipe installs
# otad's fw_env.config (boot/u-boot/fw_env.config of the otad repository) as /etc/fw_env.config,
# which fw_printenv/fw_setenv and the otad agent read; u-boot.inc installs a fw_env.config found
# in SRC_URI by itself. Without the feature this bbappend changes nothing.

FILESEXTRAPATHS:prepend:otad := "${THISDIR}/../../../../boot/u-boot:"
SRC_URI:append:otad = " file://fw_env.config"
