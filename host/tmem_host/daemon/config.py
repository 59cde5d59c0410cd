"""tmemd configuration: sizes, guest specs, the TOML file and the command line.

The command line wins over the TOML file; guests from both are merged (a
guest named on the command line replaces the file's entry of that name).
"""

from __future__ import annotations

import re
import tomllib
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
# Guest names become file names (NAME.tmem.sock) and must fit a sun_path.
_GUEST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


def parse_size(text: str | int) -> int:
    """Parse a byte size: 4096, 64K, 512M, 1G, 1.5G, 2GiB (binary units)."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"negative size: {text}")
        return text
    match = _SIZE_RE.match(text)
    if match is None:
        raise ConfigError(f"not a size: {text!r} (examples: 4096, 64K, 512M, 1G)")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.lower()])


def format_size(num_bytes: int) -> str:
    """The shortest exact binary-unit spelling of a size (inverse of parse_size)."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if num_bytes >= unit and num_bytes % unit == 0:
            return f"{num_bytes // unit}{suffix}"
    return str(num_bytes)


def validate_guest_name(name: str) -> str:
    if not _GUEST_NAME_RE.match(name):
        raise ConfigError(
            f"bad guest name {name!r}: 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return name


@dataclass(frozen=True, slots=True)
class GuestConfig:
    name: str
    weight: int = 100
    cap_bytes: int | None = None
    shared_uuids: frozenset[uuid.UUID] = field(default_factory=frozenset)
    dedup: bool = False
    # AF_VSOCK peer CID that identifies this guest, if it connects over vsock.
    cid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weight": self.weight,
            "cap_bytes": self.cap_bytes,
            "shared_uuids": sorted(str(shared) for shared in self.shared_uuids),
            "dedup": self.dedup,
            "cid": self.cid,
        }


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    run_dir: Path
    budget_bytes: int
    guests: tuple[GuestConfig, ...] = ()
    compress: bool = True
    nbd_size_bytes: int = 1 << 30
    vsock_port: int | None = None
    log_level: str = "info"
    log_format: str = "text"
    # Journals (NAME.journal) and NBD fallback files live here; None: the run dir.
    state_dir: Path | None = None
    journal: bool = True

    @property
    def state_path(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.run_dir

    def guest_for_cid(self, cid: int) -> GuestConfig | None:
        return next((guest for guest in self.guests if guest.cid == cid), None)


def check_weight(weight: object) -> int:
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 10_000:
        raise ConfigError(f"weight must be an integer from 1 to 10000, not {weight!r}")
    return weight


def parse_cap(text: str | int | None) -> int | None:
    """A cap: a size, or none/0 for no cap."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("none", "")):
        return None
    size = parse_size(text)
    return size or None


def parse_guest_spec(spec: str) -> GuestConfig:
    """Parse `NAME[:weight=W][:cap=SIZE][:shared=UUID,...][:dedup][:cid=N]`."""
    name, *options = spec.split(":")
    guest = GuestConfig(name=validate_guest_name(name))
    for option in options:
        key, has_value, value = option.partition("=")
        if key == "dedup" and not has_value:
            guest = replace(guest, dedup=True)
        elif key == "weight" and has_value:
            guest = replace(guest, weight=check_weight(_parse_int(value, "weight")))
        elif key == "cap" and has_value:
            guest = replace(guest, cap_bytes=parse_cap(value))
        elif key == "shared" and has_value:
            guest = replace(guest, shared_uuids=parse_uuids(value.split(",")))
        elif key == "cid" and has_value:
            guest = replace(guest, cid=_check_cid(_parse_int(value, "cid")))
        else:
            raise ConfigError(f"bad guest option {option!r} in {spec!r}")
    return guest


def parse_uuids(texts: list[str]) -> frozenset[uuid.UUID]:
    try:
        return frozenset(uuid.UUID(text.strip()) for text in texts if text.strip())
    except ValueError:
        raise ConfigError(f"bad shared-pool UUID in {texts!r}") from None


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{what} must be an integer, not {text!r}") from None


def _check_cid(cid: int) -> int:
    # 0-2 are the hypervisor, local and host CIDs; guests start at 3.
    if not 3 <= cid < 0xFFFFFFFF:
        raise ConfigError(f"guest CID must be from 3 to 2^32-2, not {cid}")
    return cid


def guest_from_mapping(table: dict[str, Any]) -> GuestConfig:
    """A guest from a TOML `[[guest]]` table or a control `add-guest` request."""
    known = {"name", "weight", "cap", "shared", "dedup", "cid"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"unknown guest keys: {sorted(unknown)}")
    name = table.get("name")
    if not isinstance(name, str):
        raise ConfigError("guest needs a string 'name'")
    shared = table.get("shared", [])
    if not isinstance(shared, list) or not all(isinstance(text, str) for text in shared):
        raise ConfigError("guest 'shared' must be a list of UUID strings")
    cid = table.get("cid")
    if cid is not None and (not isinstance(cid, int) or isinstance(cid, bool)):
        raise ConfigError("guest 'cid' must be an integer")
    dedup = table.get("dedup", False)
    if not isinstance(dedup, bool):
        raise ConfigError("guest 'dedup' must be true or false")
    return GuestConfig(
        name=validate_guest_name(name),
        weight=check_weight(table.get("weight", 100)),
        cap_bytes=parse_cap(table.get("cap")),
        shared_uuids=parse_uuids(shared),
        dedup=dedup,
        cid=None if cid is None else _check_cid(cid),
    )


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as config_file:
            return tomllib.load(config_file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None


def build_config(
    *,
    file_settings: dict[str, Any],
    run_dir: Path | None,
    budget: str | None,
    guest_specs: list[str],
    guest_cids: list[str],
    compress: bool | None,
    nbd_size: str | None,
    vsock_port: int | None,
    log_level: str | None,
    log_format: str | None,
    state_dir: Path | None = None,
    journal: bool | None = None,
) -> DaemonConfig:
    """Merge the TOML settings with command-line values (which take precedence)."""
    known = {"run_dir", "budget", "compress", "nbd_size", "vsock_port", "log_level",
             "log_format", "guest", "state_dir", "journal"}
    unknown = set(file_settings) - known
    if unknown:
        raise ConfigError(f"unknown config keys: {sorted(unknown)}")
    guests: dict[str, GuestConfig] = {}
    for table in file_settings.get("guest", []):
        guest = guest_from_mapping(table)
        guests[guest.name] = guest
    for spec in guest_specs:
        guest = parse_guest_spec(spec)
        guests[guest.name] = guest
    for mapping in guest_cids:
        name, sep, cid_text = mapping.partition("=")
        if not sep or name not in guests:
            raise ConfigError(f"--guest-cid {mapping!r}: expected NAME=CID for a configured guest")
        guests[name] = replace(guests[name], cid=_check_cid(_parse_int(cid_text, "cid")))
    cids = [guest.cid for guest in guests.values() if guest.cid is not None]
    if len(cids) != len(set(cids)):
        raise ConfigError("two guests map to the same vsock CID")

    run_dir_value = run_dir or file_settings.get("run_dir")
    if run_dir_value is None:
        raise ConfigError("no run directory: pass --run-dir or set run_dir in the config")
    budget_value = budget if budget is not None else file_settings.get("budget")
    if budget_value is None:
        raise ConfigError("no budget: pass --budget or set budget in the config")
    level = (log_level or file_settings.get("log_level", "info")).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"bad log level {level!r}")
    fmt = log_format or file_settings.get("log_format", "text")
    if fmt not in ("text", "json"):
        raise ConfigError(f"bad log format {fmt!r}: text or json")
    port = vsock_port if vsock_port is not None else file_settings.get("vsock_port")
    return DaemonConfig(
        run_dir=Path(run_dir_value),
        budget_bytes=parse_size(budget_value),
        guests=tuple(guests.values()),
        compress=compress if compress is not None else bool(file_settings.get("compress", True)),
        nbd_size_bytes=parse_size(nbd_size or file_settings.get("nbd_size", "1G")),
        vsock_port=port,
        log_level=level,
        log_format=fmt,
        state_dir=Path(state_value) if (state_value := state_dir or file_settings.get("state_dir"))
        else None,
        journal=journal if journal is not None else bool(file_settings.get("journal", True)),
    )
