"""Write the initial U-Boot environment copies of an otad A/B image, as the agent's own U-Boot
backend writes them (otad.agent.bootloader.uboot: redundant format, BOOT_ORDER and counters).

Usage: otad-initial-ubootenv.py FW_ENV_CONFIG DEFAULT_ENV OUT_DIR

DEFAULT_ENV is U-Boot's default environment as text (``u-boot-initial-env``, one
``name=value`` per line, deployed by the U-Boot recipe). Every copy holds it with otad's
variables on top: U-Boot uses a stored env with a valid CRC instead of its built-in default, so
without ``bootcmd`` and the board's variables the device would stop at the U-Boot prompt.

For each copy fw_env.config names (device, offset, size), OUT_DIR/copy<N>.bin holds exactly that
copy's <size> bytes; the image places each at its offset (wic rawcopy, see otad-ab-uboot.wks).
OUT_DIR/offsets lists "copy<N>.bin <offset>" so the build can check the wks against it.
"""

import sys
from pathlib import Path

from otad.agent.bootloader.uboot import EnvLocation, UBootBootloader, parse_fw_env_config


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    config, default_env, out = Path(argv[0]), Path(argv[1]), Path(argv[2])
    locations = parse_fw_env_config(config.read_text(), str(config))
    out.mkdir(parents=True, exist_ok=True)
    files = tuple(EnvLocation(out / f"copy{i}.bin", 0, loc.size) for i, loc in enumerate(locations))
    for loc in files:
        loc.device.unlink(missing_ok=True)
    builder = UBootBootloader(
        locations=files, default_env=default_env, lock_file=out / "fw_printenv.lock"
    )
    # the image builder is the one place that creates env files
    builder.initialize(create=True)
    (out / "fw_printenv.lock").unlink(missing_ok=True)
    (out / "offsets").write_text(
        "".join(f"{f.device.name} {loc.offset}\n" for f, loc in zip(files, locations, strict=True))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
