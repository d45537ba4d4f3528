"""Every command boot/grub/grub.cfg runs is built into the GRUB EFI image a Yocto build makes.

wic's bootimg-efi puts only GRUB's EFI binary on the ESP (no module directory), so grub.cfg can
use only the modules in GRUB_BUILDIN: oe-core's default plus what meta-otad's grub-efi bbappend
adds. The command -> module mapping and the module dependencies are GRUB's own
(command.lst, moddep.lst of grub-efi-amd64-bin on this machine).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from integration_files.layerfiles import LAYER, REPO, bitbake_assignments

GRUB_LIB = Path("/usr/lib/grub/x86_64-efi")
# oe-core's grub-efi recipe (scarthgap and later): GRUB_BUILDIN ?= "..."
OE_CORE_BUILDIN = [
    "boot",
    "linux",
    "ext2",
    "fat",
    "serial",
    "part_msdos",
    "part_gpt",
    "normal",
    "efi_gop",
    "iso9660",
    "configfile",
    "search",
    "loadenv",
    "test",
]
# Commands of GRUB's kernel (kern/corecmd.c): always present, not listed in command.lst.
CORE_COMMANDS = {"set", "unset", "ls", "insmod"}
KEYWORDS = {"then", "else", "fi", "do", "done", "in", "!"}
STARTERS = {"if", "elif", "while", "until"}


def grub_lists() -> tuple[dict[str, str], dict[str, list[str]]]:
    assert (GRUB_LIB / "command.lst").is_file(), (
        f"{GRUB_LIB} is missing: install grub-efi-amd64-bin (scripts/install-system-deps test)"
    )
    commands = {}
    for line in (GRUB_LIB / "command.lst").read_text().splitlines():
        name, module = line.split(": ")
        commands[name.lstrip("*")] = module
    deps = {}
    for line in (GRUB_LIB / "moddep.lst").read_text().splitlines():
        module, _, rest = line.partition(":")
        deps[module] = rest.split()
    return commands, deps


def closure(modules: list[str], deps: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(deps.get(module, []))
    return seen


def script_commands(text: str) -> set[str]:
    """The command names a GRUB script runs (first word of every statement)."""
    found: set[str] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        for statement in re.split(r";\s*", line):
            words = shlex.split(statement, comments=False) if statement else []
            while words and (words[0] in KEYWORDS or words[0] in STARTERS):
                words = words[1:]
            if not words or words[0] == "for":
                continue
            if "=" in words[0] and not words[0].startswith("["):
                continue  # an assignment such as A=1
            found.add(words[0])
    return found


def test_grub_cfg_commands_are_built_into_the_efi_image() -> None:
    commands, deps = grub_lists()
    used = script_commands((REPO / "boot" / "grub" / "grub.cfg").read_text())
    assert {"load_env", "save_env", "linux", "reboot", "search"} <= used
    unknown = sorted(c for c in used if c not in commands and c not in CORE_COMMANDS)
    assert not unknown, f"grub.cfg runs commands GRUB does not have: {unknown}"
    needed = {commands[c] for c in used if c in commands}
    bbappend = bitbake_assignments(
        (LAYER / "recipes-bsp" / "grub" / "grub-efi_%.bbappend").read_text()
    )
    (added,) = [v for _, v in bbappend["GRUB_BUILDIN:append:otad"]]
    built_in = closure(OE_CORE_BUILDIN + added.split(), deps)
    missing = sorted(needed - built_in)
    assert not missing, f"add to GRUB_BUILDIN:append:otad: {missing}"
    # and the bbappend adds nothing the script does not need
    assert set(added.split()) <= closure(sorted(needed), deps)


def test_grub_module_check_is_not_vacuous() -> None:
    commands, deps = grub_lists()
    used = script_commands("if [ -n x ]; then\n  echo hi\n  reboot\nfi\n")
    assert used == {"[", "echo", "reboot"}
    needed = {commands[c] for c in used}
    assert needed - closure(OE_CORE_BUILDIN, deps) == {"echo", "reboot"}
