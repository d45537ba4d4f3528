"""Write the initial GRUB environment of an otad A/B image: both env copies, as the agent's own
GRUB backend writes them (otad.agent.bootloader.grub.write_initial), so the image and the agent
can never disagree on the format.

Usage: otad-initial-grubenv.py OUT_DIR [--no-initrd]
  --no-initrd  the image has no initramfs: grub.cfg then boots the kernel alone (otad_noinitrd).
"""

import sys
from pathlib import Path

from otad.agent.bootloader.grub import initial_values, write_initial


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2 or (len(argv) == 2 and argv[1] != "--no-initrd"):
        print(__doc__, file=sys.stderr)
        return 2
    values = initial_values()
    if len(argv) == 2:
        values["otad_noinitrd"] = "1"
    write_initial(Path(argv[0]), values)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
