"""Readers for the integration files the tests check: systemd units, the shared partition-name
file, wks layouts, and the few BitBake constructs of meta-otad the tests evaluate.

Strict on purpose: a line a reader does not understand raises :class:`FileFormatError` rather
than being skipped, so a check can never pass because it silently read nothing.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYER = REPO / "yocto-layer" / "meta-otad"
SYSTEMD = REPO / "systemd"
PARTITIONS_ENV = LAYER / "wic" / "otad-partitions.env"


class FileFormatError(ValueError):
    """A file under test does not have the shape its reader expects."""


# --- KEY="value" files (wic/otad-partitions.env) -------------------------------------------

_ENV_LINE = re.compile(r'^(?P<key>[A-Z][A-Z0-9_]*)="(?P<value>[^"\\$`]*)"$')


def parse_env(text: str) -> dict[str, str]:
    """Parse a shell-sourceable file of ``KEY="value"`` lines, ``#`` comments and blank lines."""
    values: dict[str, str] = {}
    # Split as the shell does: on newlines only (str.splitlines also splits on \x1e, \u2028...).
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        if match is None:
            raise FileFormatError(f'line {number}: not KEY="value": {line!r}')
        key = match["key"]
        if key in values:
            raise FileFormatError(f"line {number}: {key} assigned twice")
        values[key] = match["value"]
    return values


def format_env(values: Mapping[str, str]) -> str:
    """The inverse of :func:`parse_env` (used by the round-trip property test)."""
    return "".join(f'{key}="{value}"\n' for key, value in values.items())


# --- systemd unit files ----------------------------------------------------------------------


@dataclass(frozen=True)
class UnitEntry:
    section: str
    key: str
    value: str
    line: int
    comment: tuple[str, ...] = field(default=())  # the comment lines right above the entry


def parse_unit(text: str) -> list[UnitEntry]:
    """Parse a unit file into entries, each with the comment block directly above it."""
    entries: list[UnitEntry] = []
    section = ""
    comment: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            comment = []
            continue
        if line[0] in "#;":
            comment.append(line[1:].strip())
            continue
        if line.endswith("\\"):
            raise FileFormatError(f"line {number}: continuation lines are not used in our units")
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise FileFormatError(f"line {number}: bad section header {line!r}")
            section = line[1:-1]
            comment = []
            continue
        if "=" not in line or not section:
            raise FileFormatError(f"line {number}: not key=value inside a section: {line!r}")
        key, value = line.split("=", 1)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()):
            raise FileFormatError(f"line {number}: bad key {key!r}")
        entries.append(UnitEntry(section, key.strip(), value.strip(), number, tuple(comment)))
    return entries


def unit_values(entries: list[UnitEntry], section: str, key: str) -> list[str]:
    return [e.value for e in entries if e.section == section and e.key == key]


# --- wic kickstart files ---------------------------------------------------------------------


@dataclass(frozen=True)
class WksPart:
    mountpoint: str | None
    options: dict[str, str]  # "--part-name" -> "rootfs_a"; flags map to ""


_WKS_FLAGS = {"--active", "--no-fstab-update", "--use-label", "--use-uuid", "--no-table"}


def _wks_options(words: list[str], number: int) -> dict[str, str]:
    options: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise FileFormatError(f"line {number}: unexpected word {word!r}")
        if word in _WKS_FLAGS:
            options[word] = ""
            i += 1
            continue
        if i + 1 >= len(words):
            raise FileFormatError(f"line {number}: {word} needs a value")
        options[word] = words[i + 1]
        i += 2
    return options


def parse_wks(text: str) -> tuple[dict[str, str], list[WksPart]]:
    """Parse a static wks file: one ``bootloader`` line and ``part`` lines."""
    bootloader: dict[str, str] | None = None
    parts: list[WksPart] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError as exc:  # unbalanced quotes
            raise FileFormatError(f"line {number}: {exc}") from exc
        if words[0] == "bootloader":
            if bootloader is not None:
                raise FileFormatError(f"line {number}: second bootloader line")
            bootloader = _wks_options(words[1:], number)
        elif words[0] == "part":
            mountpoint = None
            rest = words[1:]
            if rest and not rest[0].startswith("--"):
                mountpoint, rest = rest[0], rest[1:]
            parts.append(WksPart(mountpoint, _wks_options(rest, number)))
        else:
            raise FileFormatError(f"line {number}: unknown directive {words[0]!r}")
    if bootloader is None:
        raise FileFormatError("no bootloader line")
    return bootloader, parts


# --- BitBake metadata ------------------------------------------------------------------------

_ASSIGN = re.compile(
    r'^(?P<var>[A-Za-z0-9_\-]+(?::[A-Za-z0-9_\-${}]+)*)\s*(?P<op>\?\?=|\?=|:=|\+=|=\+|\.=|=)\s*"'
)


def bitbake_assignments(text: str) -> dict[str, list[tuple[str, str]]]:
    """Every plain ``VAR op "value"`` assignment (continuation lines joined), by variable name."""
    found: dict[str, list[tuple[str, str]]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _ASSIGN.match(lines[i])
        if match is None:
            i += 1
            continue
        logical = lines[i]
        continued = False
        while logical.endswith("\\") and i + 1 < len(lines):
            i += 1
            logical = logical[:-1] + " " + lines[i].strip()
            continued = True
        value_part = logical[match.end() :]
        if not value_part.endswith('"'):
            raise FileFormatError(f"unterminated value for {match['var']}: {logical!r}")
        # A value continued over lines is a list: its line breaks and indents are not content.
        value = " ".join(value_part[:-1].split()) if continued else value_part[:-1]
        found.setdefault(match["var"], []).append((match["op"], value))
        i += 1
    return found


def default_of(assignments: dict[str, list[tuple[str, str]]], var: str) -> str:
    """The single default (``?=``, ``??=``, ``=`` or ``:=``) a file gives ``var``."""
    values = [v for op, v in assignments.get(var, []) if op in ("?=", "??=", "=", ":=")]
    if len(values) != 1:
        raise FileFormatError(f"{var}: expected one default, found {values!r}")
    return values[0]


_REF = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


def expand(value: str, variables: Mapping[str, str], *, depth: int = 0) -> str:
    """Expand ``${VAR}`` references; an unknown variable is an error, never an empty string."""
    if depth > 20:
        raise FileFormatError(f"expansion too deep in {value!r}")

    def one(match: re.Match[str]) -> str:
        name = match[1]
        if name not in variables:
            raise FileFormatError(f"${{{name}}} is not defined")
        return expand(variables[name], variables, depth=depth + 1)

    if "${@" in value:
        raise FileFormatError(f"inline python is not evaluated here: {value!r}")
    return _REF.sub(one, value)


def python_function(text: str, name: str) -> str:
    """The source of the top-level ``def name(...)`` block of a .bbclass / .bb file."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        if line.startswith(f"def {name}("):
            end = start + 1
            while end < len(lines) and (not lines[end] or lines[end].startswith((" ", "\t"))):
                end += 1
            return "\n".join(lines[start:end]) + "\n"
    raise FileFormatError(f"no top-level def {name}")


def shell_function(text: str, name: str) -> str:
    """The body of a BitBake shell function ``name() {`` ... ``}`` (closing brace in column 0)."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        if line.strip() == f"{name}() {{":
            for end in range(start + 1, len(lines)):
                if lines[end] == "}":
                    return "\n".join(lines[start + 1 : end]) + "\n"
            raise FileFormatError(f"{name}: no closing brace")
    raise FileFormatError(f"no shell function {name}")


def python_task(text: str, name: str) -> str:
    """The body of ``python name() {`` ... ``}`` as a plain function of (d, e, bb)."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        if line.strip() == f"python {name}() {{":
            for end in range(start + 1, len(lines)):
                if lines[end] == "}":
                    body = lines[start + 1 : end]
                    return f"def {name}(d, e, bb):\n" + "\n".join(body or ["    pass"]) + "\n"
            raise FileFormatError(f"{name}: no closing brace")
    raise FileFormatError(f"no python function {name}")


class FakeDatastore:
    """The part of BitBake's datastore recipe code uses here: ``getVar`` with expansion."""

    def __init__(self, variables: Mapping[str, str]) -> None:
        self.variables = dict(variables)

    def getVar(self, name: str) -> str | None:  # BitBake's spelling
        value = self.variables.get(name)
        return None if value is None else expand_python(value, self.variables)

    def appendVarFlag(self, var: str, flag: str, value: str) -> None:  # BitBake's spelling
        key = f"{var}[{flag}]"
        self.variables[key] = self.variables.get(key, "") + value


class FakeBitbake:
    """``bb.utils.contains``, ``bb.warn``, ``bb.fatal`` as recipe code calls them."""

    class Fatal(Exception):
        pass

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.utils = self

    def contains(self, var: str, items: str, yes: object, no: object, d: FakeDatastore) -> object:
        have = set((d.getVar(var) or "").split())
        return yes if set(items.split()) <= have else no

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def fatal(self, message: str) -> None:
        raise FakeBitbake.Fatal(message)

    def note(self, message: str) -> None:
        pass


def expand_python(value: str, variables: Mapping[str, str]) -> str:
    """Like :func:`expand`, also evaluating ``${@expr}`` with a fake ``d`` and ``bb``."""
    out = value
    while "${@" in out:
        start = out.index("${@")
        depth, end = 0, start + 3
        for end in range(start + 3, len(out)):
            if out[end] == "{":
                depth += 1
            elif out[end] == "}":
                if depth == 0:
                    break
                depth -= 1
        else:
            raise FileFormatError(f"unterminated inline python in {value!r}")
        expr = out[start + 3 : end]
        d = FakeDatastore(variables)
        result = eval(expr, {"d": d, "bb": FakeBitbake()})  # noqa: S307 - the layer's own code
        out = out[:start] + str(result) + out[end + 1 :]
    return expand(out, variables)
