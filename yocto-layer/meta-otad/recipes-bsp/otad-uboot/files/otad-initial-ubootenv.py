"""Write the initial U-Boot environment copies of an otad A/B image, as the agent's own U-Boot
backend writes them (otad.agent.bootloader.uboot: redundant format, BOOT_ORDER and counters).

Usage: otad-initial-ubootenv.py FW_ENV_CONFIG OUT_DIR

For each copy fw_env.config names (device, offset, size), OUT_DIR/copy<N>.bin holds exactly that
copy's <size> bytes; the image places each at its offset (wic rawcopy, see otad-ab-uboot.wks).
OUT_DIR/offsets lists "copy<N>.bin <offset>" so the build can check the wks against it.
"""

import sys
from pathlib import Path

from otad.agent.bootloader.uboot import EnvLocation, UBootBootloader, parse_fw_env_config


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    config, out = Path(argv[0]), Path(argv[1])
    locations = parse_fw_env_config(config.read_text(), str(config))
    out.mkdir(parents=True, exist_ok=True)
    files = tuple(EnvLocation(out / f"copy{i}.bin", 0, loc.size) for i, loc in enumerate(locations))
    for loc in files:
        loc.device.unlink(missing_ok=True)
    UBootBootloader(locations=files).initialize()
    (out / "offsets").write_text(
        "".join(f"{f.device.name} {loc.offset}\n" for f, loc in zip(files, locations, strict=True))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
