# otad A/B boot script for U-Boot (hush). Compile: mkimage -A arm64 -T script -C none -d boot.cmd boot.scr
#
# Slot selection (RAUC's scheme): take the slots of BOOT_ORDER in turn; the first whose
# BOOT_X_LEFT is above 0 wins; its counter is decremented and saved *before* the kernel starts.
# The running system confirms its slot by resetting the counter (otad does that on start); a
# slot whose counter reached 0 is skipped, so an update that never comes up falls back to the
# other slot. A slot marked bad is not in BOOT_ORDER.
# Last resort, when no slot has attempts left (the good slot's confirmations were lost to power
# cuts): the first slot of BOOT_ORDER that is not on trial (otad_trial) boots with
# otad.rescue=1 and nothing is saved; the agent then confirms it. A slot on trial never gets an
# attempt it was not given. With no BOOT_ORDER at all (env lost), slot A boots that way.
# Counters are single digits (setexpr computes in hex; otad writes at most 9).
#
# Where the env is stored:
#   default          U-Boot's own env storage, saved with `saveenv`. Configure the redundant
#                    env (CONFIG_SYS_REDUNDAND_ENVIRONMENT + CONFIG_ENV_OFFSET_REDUND, or
#                    CONFIG_ENV_FAT_FILE_REDUND) so a power cut during saveenv keeps the other
#                    copy; boot/u-boot/fw_env.config lists the same copies for the agent.
#   otad_envfile set an env file on a FAT partition, imported and written back by this script
#                    (for boards or emulators where saveenv cannot write, e.g. QEMU pflash).
#                    One copy: a power cut during fatwrite loses it (U-Boot then rescue-boots A
#                    and the agent rewrites the env). Variables:
#                      otad_envdev  (virtio 0:1)  otad_envaddr (0x48000000)  otad_envsize (0x4000)
#
# Board variables (set them in the default env; defaults below):
#   otad_bootdev      device and disk of the slots for `load`          (mmc 0)
#   otad_part_a/_b    partition numbers of the slots                    (2 / 3)
#   otad_label_a/_b   GPT partition names for root=PARTLABEL=           (rootfs_a / rootfs_b)
#   otad_kernel       kernel path inside the slot                       (/boot/Image)
#   otad_kernel_addr  load address (the default env may lack kernel_addr_r)  (0x40400000)
#   otad_bootargs     console and other kernel arguments                (console=ttyAMA0)
#   otad_boot         the command that loads and starts the kernel; it sees otad_partnum
#                     and bootargs (default: load from the slot partition, then booti)
#   otad_extra        extra kernel arguments (kept in the env, for tests)
# The kernel command line always carries otad.slot=A|B: the agent reads the booted slot there.

test -n "${otad_bootdev}" || setenv otad_bootdev "mmc 0"
test -n "${otad_part_a}" || setenv otad_part_a 2
test -n "${otad_part_b}" || setenv otad_part_b 3
test -n "${otad_label_a}" || setenv otad_label_a rootfs_a
test -n "${otad_label_b}" || setenv otad_label_b rootfs_b
test -n "${otad_kernel}" || setenv otad_kernel /boot/Image
test -n "${otad_kernel_addr}" || setenv otad_kernel_addr 0x40400000
test -n "${otad_bootargs}" || setenv otad_bootargs console=ttyAMA0
test -n "${otad_boot}" || setenv otad_boot 'load ${otad_bootdev}:${otad_partnum} ${otad_kernel_addr} ${otad_kernel} && booti ${otad_kernel_addr} - ${fdtcontroladdr}'
test -n "${otad_envdev}" || setenv otad_envdev "virtio 0:1"
test -n "${otad_envaddr}" || setenv otad_envaddr 0x48000000
test -n "${otad_envsize}" || setenv otad_envsize 0x4000

setenv otad_envvars "BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT otad_trial otad_extra"
if test -n "${otad_envfile}"; then
    setenv BOOT_ORDER
    if load ${otad_envdev} ${otad_envaddr} ${otad_envfile}; then
        env import -c ${otad_envaddr} ${otad_envsize} ${otad_envvars}
    fi
fi

setenv otad_slot
for otad_s in ${BOOT_ORDER}; do
    if test -z "${otad_slot}"; then
        if test "${otad_s}" = "A"; then
            if test -n "${BOOT_A_LEFT}" && test ${BOOT_A_LEFT} -gt 0; then
                setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
                setenv otad_slot A
            fi
        elif test "${otad_s}" = "B"; then
            if test -n "${BOOT_B_LEFT}" && test ${BOOT_B_LEFT} -gt 0; then
                setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
                setenv otad_slot B
            fi
        fi
    fi
done

setenv otad_rescue
if test -n "${otad_slot}"; then
    echo "otad: -> slot ${otad_slot} (attempts left: A=${BOOT_A_LEFT} B=${BOOT_B_LEFT})"
    if test -n "${otad_envfile}"; then
        env export -c -s ${otad_envsize} ${otad_envaddr} ${otad_envvars}
        fatwrite ${otad_envdev} ${otad_envaddr} ${otad_envfile} ${otad_envsize}
    else
        saveenv
    fi
else
    # last resort: a committed slot (in BOOT_ORDER, not on trial) despite its spent counter
    for otad_s in ${BOOT_ORDER}; do
        if test -z "${otad_slot}"; then
            if test "${otad_s}" = "A" || test "${otad_s}" = "B"; then
                if test "${otad_s}" != "${otad_trial}"; then
                    setenv otad_slot ${otad_s}
                fi
            fi
        fi
    done
    if test -z "${otad_slot}"; then
        setenv otad_slot A
    fi
    echo "otad: no slot with attempts left in BOOT_ORDER=[${BOOT_ORDER}]: rescue boot of slot ${otad_slot}"
    setenv otad_rescue otad.rescue=1
fi

if test "${otad_slot}" = "A"; then
    setenv otad_partnum ${otad_part_a}
    setenv otad_label ${otad_label_a}
else
    setenv otad_partnum ${otad_part_b}
    setenv otad_label ${otad_label_b}
fi
setenv bootargs "${otad_bootargs} root=PARTLABEL=${otad_label} rootwait otad.slot=${otad_slot} ${otad_rescue} ${otad_extra}"
run otad_boot

# Only reached when the kernel did not start: the counter is already spent, start over.
echo "otad: booting slot ${otad_slot} failed"
sleep 3
reset
