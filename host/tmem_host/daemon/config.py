"""tmemd configuration: sizes, guest specs, the TOML file and the command line.

The command line wins over the TOML file; guests from both are merged (a
guest named on the command line replaces the file's entry of that name).
Values are checked strictly (a TOML boolean is `true`, never `"false"`); each
bad one is a ConfigError whose one-line message names the setting (its flag
when it came from the command line, its key when from the file) and what it
must be.
"""

from __future__ import annotations

import argparse
import grp
import re
import socket
import tomllib
import uuid
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Final, NoReturn

from tmem_host.replies import GuestSettings
from tmem_host.journal.journaled import DURABILITY_LEVELS
from tmem_host.remote.tier import parse_seeds

from tmem_wire.frontswap import PAGE_SIZE

# Beyond any host's memory: a bigger budget or cap is a typo, not a plan.
MAX_SIZE_BYTES: Final = 1 << 50
# The largest NBD export or journal reserve: a file on the state dir's disk.
MAX_FILE_BYTES: Final = 1 << 40
# vsock ports and CIDs are 32 bits; 2^32-1 is VMADDR_PORT_ANY / VMADDR_CID_ANY.
MAX_VSOCK_ID: Final = 0xFFFFFFFE
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")
# ASCII digits, and few of them: a typo must not build a number int() refuses.
_SIZE_RE = re.compile(r"^\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([kmgtp]?)(?:i?b)?\s*$",
                      re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
# Guest names become file names (NAME.tmem.sock) and must fit a sun_path.
_GUEST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_GUEST_KEYS: Final = frozenset({"name", "weight", "cap", "shared", "dedup", "cid", "uuid",
                                "remote_cap", "remote_ephemeral", "cached_disk",
                                "cached_disk_pool", "cached_disk_write_allocate"})
#: A guest's default identity in the remote tier: uuid5 of its name in this namespace.
GUEST_UUID_NAMESPACE: Final = uuid.UUID("6d1b5a3e-8f0c-4b7e-9a51-2f4c0e7d9b10")
MAX_REMOTE_REPLICAS: Final = 16
MAX_REMOTE_READ_AHEAD: Final = 64
MAX_ENCODER_THREADS: Final = 8
_FILE_KEYS: Final = frozenset({
    "run_dir", "budget", "compress", "nbd_size", "vsock_port", "log_level", "log_format",
    "guest", "state_dir", "journal", "durability", "preallocate", "journal_reserve",
    "socket_group", "connections_per_guest", "handshake_timeout", "idle_timeout",
    "remote", "remote_replicas", "remote_wait", "remote_budget", "remote_read_ahead", "host_id",
    "fallback_iops", "encoder_threads",
})


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """A bad argument is one line, `PROG: MESSAGE`, and exit 2, like a bad value
    in the config file (argparse's default prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def _shown(value: object) -> str:
    """A value for an error message: repr (so one line), cut short if long;
    booleans as TOML and JSON spell them."""
    text = str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 40 else f"{text[:32]}... ({len(text)} characters)"


def _fail(name: str, expected: str, value: object) -> NoReturn:
    raise ConfigError(f"{name} must be {expected}, not {_shown(value)}")


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        _fail(name, "true or false", value)
    return value


def check_int(value: object, name: str, minimum: int, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        _fail(name, f"an integer from {minimum} to {maximum}", value)
    return value


def check_seconds(value: object, name: str, maximum: float) -> float:
    # NaN fails the comparison, infinity the maximum.
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= maximum:
        _fail(name, f"a number of seconds above 0 and at most {maximum:g}", value)
    return float(value)


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        _fail(name, "one of " + ", ".join(choices), value)
    return value.lower()


def check_path(value: object, name: str) -> Path:
    text = str(value) if isinstance(value, Path) else value
    if not isinstance(text, str) or not text or "\0" in text:
        _fail(name, "a path (a non-empty string)", value)
    return Path(text)


def check_group(value: object, name: str) -> str:
    """A group name, or a numeric gid as a string, that exists on this host."""
    if not isinstance(value, str) or not value:
        _fail(name, "a group name or numeric gid (a string)", value)
    try:
        if value.isascii() and value.isdigit():
            grp.getgrgid(int(value))
        else:
            grp.getgrnam(value)
    except (KeyError, OverflowError, ValueError):
        raise ConfigError(f"{name}: no group {_shown(value)} on this host") from None
    return value


def parse_size(value: object, name: str | None = None, *, minimum: int = 0,
               maximum: int = MAX_SIZE_BYTES, multiple: int = 1) -> int:
    """A byte size: an integer, or a string such as 4096, 64K, 512M, 1.5G, 2GiB
    (binary units) that comes to a whole number of bytes; it must lie within
    [minimum, maximum] and be a multiple of `multiple`."""
    size = _exact_size(value)
    if size is None:
        prefix = f"{name}: " if name else ""
        raise ConfigError(f"{prefix}not a size: {_shown(value)} (examples: 4096, 64K, 512M, 1G)")
    if not minimum <= size <= maximum or size % multiple:
        steps = f" in multiples of {multiple}" if multiple > 1 else ""
        _fail(name or "size", f"from {format_size(minimum)} to {format_size(maximum)} bytes{steps}",
              value)
    return size


def _exact_size(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    number, unit = match.groups()
    exact = Fraction(number) * _SIZE_UNITS[unit.lower()]
    return exact.numerator if exact.denominator == 1 else None


def format_size(num_bytes: int) -> str:
    """The shortest exact binary-unit spelling of a size (inverse of parse_size)."""
    for suffix, unit in (("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20),
                         ("K", 1 << 10)):
        if num_bytes >= unit and num_bytes % unit == 0:
            return f"{num_bytes // unit}{suffix}"
    return str(num_bytes)


def validate_guest_name(name: str) -> str:
    if not _GUEST_NAME_RE.match(name):
        raise ConfigError(
            f"bad guest name {_shown(name)}: 1-64 characters of letters, digits, '_', '.', '-'"
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
    # Its identity in the remote tier (its pages' namespace, the same on every
    # host); None: uuid5 of its name (identity_uuid).
    guest_uuid: uuid.UUID | None = None
    # The remote bytes it may use (None: no cap but the remote budget's share).
    remote_cap_bytes: int | None = None
    # Its evicted ephemeral pages go to the remote tier instead of being dropped.
    remote_ephemeral: bool = False
    # A disk image tmemd serves to the guest over NBD (NAME.disk.nbd.sock) with
    # the guest's ephemeral pool as its read cache (nbd.readcache).
    cached_disk: Path | None = None
    # Its cached disk's pages go to the shared ephemeral pool of this UUID, with
    # every other guest's whose cached disk is the same image (the host's say-so:
    # tmemd refuses another image under the same UUID).
    cached_disk_pool: uuid.UUID | None = None
    # Its cached disk puts what the guest writes into the cache as well (write-
    # allocate, as cleancache puts a written page once it is clean and evicted);
    # without it only what was read is cached (write-around).
    cached_disk_write_allocate: bool = False

    @property
    def identity_uuid(self) -> uuid.UUID:
        return self.guest_uuid if self.guest_uuid is not None else uuid.uuid5(GUEST_UUID_NAMESPACE, self.name)

    def to_json(self) -> GuestSettings:
        return {
            "name": self.name,
            "weight": self.weight,
            "cap_bytes": self.cap_bytes,
            "shared_uuids": sorted(str(shared) for shared in self.shared_uuids),
            "dedup": self.dedup,
            "cid": self.cid,
            "uuid": str(self.identity_uuid),
            "remote_cap_bytes": self.remote_cap_bytes,
            "remote_ephemeral": self.remote_ephemeral,
            "cached_disk": None if self.cached_disk is None else str(self.cached_disk),
            "cached_disk_pool": None if self.cached_disk_pool is None else str(self.cached_disk_pool),
            "cached_disk_write_allocate": self.cached_disk_write_allocate,
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
    # What survives a crash: one of DURABILITY_LEVELS (docs/RELIABILITY.md).
    durability: str = "journal"
    # Allocate fallback files and journal room up front, so a full disk fails at start.
    preallocate: bool = True
    journal_reserve_bytes: int = 64 << 20
    # Sockets are group-accessible (0660) to this group; None: owner only (0600).
    socket_group: str | None = None
    connections_per_guest: int = 8
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    # The remote tier (docs/REMOTE.md): Redis Cluster seed nodes, None: no tier.
    remote_seeds: tuple[tuple[str, int], ...] | None = None
    remote_replicas: int = 0
    remote_wait_s: float = 10.0
    remote_budget_bytes: int | None = None
    # Neighbourhoods of 64 pages the tier reads ahead of a sequential stream of gets.
    remote_read_ahead: int = 2
    # This tmemd's name among the hosts sharing a cluster (logs, stats).
    host_id: str = ""
    # The NBD fallback files answer as a disk of this many operations per second
    # would (frontswap's real swap disk); 0: at page-cache speed.
    fallback_iops: int = 0
    # Threads that compress PUT_BATCH pages ahead of the event loop (0: it does).
    encoder_threads: int = 1

    @property
    def journal(self) -> bool:
        """Whether the guests' journals are written (durability journal or fsync)."""
        return self.durability != "none"

    @property
    def state_path(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.run_dir

    def guest_for_cid(self, cid: int) -> GuestConfig | None:
        return next((guest for guest in self.guests if guest.cid == cid), None)


# The defaults of the settings build_config falls back to.
_DEFAULTS: Final = DaemonConfig(run_dir=Path("."), budget_bytes=0)


def check_weight(weight: object, name: str = "weight") -> int:
    return check_int(weight, name, 1, 10_000)


def parse_cap(value: object, name: str = "cap") -> int | None:
    """A cap: a size, or None / "none" / 0 for no cap."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    return parse_size(value, name) or None


def parse_guest_spec(spec: str) -> GuestConfig:
    """Parse `NAME[:weight=W][:cap=SIZE][:shared=UUID,...][:dedup][:cid=N][:uuid=UUID]
    [:remote-cap=SIZE][:remote-ephemeral][:cached-disk=PATH][:cached-disk-pool=UUID]
    [:cached-disk-write-allocate]`."""
    name, *options = spec.split(":")
    guest = GuestConfig(name=validate_guest_name(name))
    what = f"guest {name!r}"
    for option in options:
        key, has_value, value = option.partition("=")
        if key == "dedup" and not has_value:
            guest = replace(guest, dedup=True)
        elif key == "remote-ephemeral" and not has_value:
            guest = replace(guest, remote_ephemeral=True)
        elif key == "cached-disk-write-allocate" and not has_value:
            guest = replace(guest, cached_disk_write_allocate=True)
        elif key == "weight" and has_value:
            guest = replace(guest, weight=check_weight(_parse_int(value), f"{what} weight"))
        elif key == "cap" and has_value:
            guest = replace(guest, cap_bytes=parse_cap(value, f"{what} cap"))
        elif key == "shared" and has_value:
            guest = replace(guest, shared_uuids=parse_uuids(value.split(",")))
        elif key == "cid" and has_value:
            guest = replace(guest, cid=_check_cid(_parse_int(value), f"{what} cid"))
        elif key == "uuid" and has_value:
            guest = replace(guest, guest_uuid=_parse_uuid(value, f"{what} uuid"))
        elif key == "remote-cap" and has_value:
            guest = replace(guest, remote_cap_bytes=parse_cap(value, f"{what} remote-cap"))
        elif key == "cached-disk" and has_value:
            guest = replace(guest, cached_disk=check_path(value, f"{what} cached-disk"))
        elif key == "cached-disk-pool" and has_value:
            guest = replace(guest, cached_disk_pool=_parse_uuid(value, f"{what} cached-disk-pool"))
        else:
            raise ConfigError(f"bad guest option {_shown(option)} in {_shown(spec)}")
    return _checked_guest(guest)


def _checked_guest(guest: GuestConfig) -> GuestConfig:
    """What one option alone cannot say is wrong."""
    if guest.cached_disk_pool is not None and guest.cached_disk is None:
        raise ConfigError(f"guest {guest.name!r}: cached-disk-pool needs a cached-disk")
    if guest.cached_disk_write_allocate and guest.cached_disk is None:
        raise ConfigError(f"guest {guest.name!r}: cached-disk-write-allocate needs a cached-disk")
    return guest


def parse_uuids(texts: list[str]) -> frozenset[uuid.UUID]:
    try:
        return frozenset(uuid.UUID(text.strip()) for text in texts if text.strip())
    except ValueError:
        raise ConfigError(f"bad shared-pool UUID in {_shown(texts)}") from None


def _parse_uuid(value: object, name: str) -> uuid.UUID:
    try:
        if isinstance(value, str):
            return uuid.UUID(value.strip())
    except ValueError:
        pass
    _fail(name, "a UUID", value)


def parse_remote_seeds(value: object, name: str) -> tuple[tuple[str, int], ...]:
    """`host:port[,host:port...]`: the Redis Cluster nodes tmemd starts from."""
    if isinstance(value, str):
        try:
            return parse_seeds(value)
        except ValueError:
            pass
    _fail(name, "host:port[,host:port...]", value)


def _parse_int(text: str) -> int | str:
    """The integer `text` spells, or `text` itself for the range check to reject."""
    try:
        return int(text)
    except ValueError:
        return text


def _check_cid(cid: object, name: str = "guest CID") -> int:
    # 0-2 are the hypervisor, local and host CIDs; guests start at 3.
    return check_int(cid, name, 3, MAX_VSOCK_ID)


def guest_from_mapping(table: object) -> GuestConfig:
    """A guest from a TOML `[[guest]]` table or a control `add-guest` request."""
    if not isinstance(table, dict):
        _fail("each guest", "a table ([[guest]] with a name)", table)
    unknown = set(table) - _GUEST_KEYS
    if unknown:
        raise ConfigError(f"unknown guest keys: {_shown(sorted(unknown))}")
    name = table.get("name")
    if not isinstance(name, str):
        _fail("a guest's 'name'", "a string", name)
    what = f"guest {validate_guest_name(name)!r}"
    shared = table.get("shared", [])
    if not isinstance(shared, list) or not all(isinstance(text, str) for text in shared):
        _fail(f"{what} shared", "a list of UUID strings", shared)
    cid = table.get("cid")
    guest_uuid = table.get("uuid")
    cached_disk = table.get("cached_disk")
    cached_disk_pool = table.get("cached_disk_pool")
    return _checked_guest(GuestConfig(
        name=name,
        weight=check_weight(table.get("weight", 100), f"{what} weight"),
        cap_bytes=parse_cap(table.get("cap"), f"{what} cap"),
        shared_uuids=parse_uuids(shared),
        dedup=check_bool(table.get("dedup", False), f"{what} dedup"),
        cid=None if cid is None else _check_cid(cid, f"{what} cid"),
        guest_uuid=None if guest_uuid is None else _parse_uuid(guest_uuid, f"{what} uuid"),
        remote_cap_bytes=parse_cap(table.get("remote_cap"), f"{what} remote_cap"),
        remote_ephemeral=check_bool(table.get("remote_ephemeral", False), f"{what} remote_ephemeral"),
        cached_disk=None if cached_disk is None else check_path(cached_disk, f"{what} cached_disk"),
        cached_disk_pool=None if cached_disk_pool is None else _parse_uuid(cached_disk_pool,
                                                                           f"{what} cached_disk_pool"),
        cached_disk_write_allocate=check_bool(table.get("cached_disk_write_allocate", False),
                                              f"{what} cached_disk_write_allocate"),
    ))


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as config_file:
            return tomllib.load(config_file)
    # ValueError: not UTF-8, an integer too long to convert; RecursionError: deep nesting.
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None


def _pick(file_settings: dict[str, Any], key: str, given: object,
          default: object = None) -> tuple[object, str]:
    """A setting's value, from the command line if given there (it wins), else from
    the file, else `default`; and the name to blame it on: the flag or the key."""
    if given is not None:
        return given, "--" + key.replace("_", "-")
    return file_settings.get(key, default), key


def _durability(journal: object, level: object, journal_off: str, level_name: str) -> str | None:
    """The durability one source (command line or file) asks for, if any. A journal
    that is off is durability none; `journal = true` defers to `durability`."""
    chosen = None if level is None else check_choice(level, level_name, DURABILITY_LEVELS)
    if journal is None or check_bool(journal, "journal"):
        return chosen
    if chosen not in (None, "none"):
        raise ConfigError(f"{journal_off} contradicts {level_name} {chosen}: "
                          "without a journal the durability is none")
    return "none"


def _add_guest(guests: dict[str, GuestConfig], guest: GuestConfig, where: str) -> None:
    if guest.name in guests:
        raise ConfigError(f"guest {guest.name} given twice {where}")
    guests[guest.name] = guest


def _merge_guests(tables: object, guest_specs: list[str],
                  guest_cids: list[str]) -> tuple[GuestConfig, ...]:
    if not isinstance(tables, list):
        _fail("guest", "a list of tables ([[guest]])", tables)
    from_file: dict[str, GuestConfig] = {}
    for table in tables:
        _add_guest(from_file, guest_from_mapping(table), "in the config")
    from_command_line: dict[str, GuestConfig] = {}
    for spec in guest_specs:
        _add_guest(from_command_line, parse_guest_spec(spec), "on the command line")
    merged = from_file | from_command_line
    with_cid: set[str] = set()
    for mapping in guest_cids:
        name, sep, cid_text = mapping.partition("=")
        if not sep or name not in merged:
            raise ConfigError(
                f"--guest-cid {_shown(mapping)}: expected NAME=CID for a configured guest")
        if name in with_cid:
            raise ConfigError(f"--guest-cid given twice for guest {name}")
        with_cid.add(name)
        merged[name] = replace(merged[name],
                               cid=_check_cid(_parse_int(cid_text), f"--guest-cid {name}"))
    cids = [guest.cid for guest in merged.values() if guest.cid is not None]
    if len(cids) != len(set(cids)):
        raise ConfigError("two guests map to the same vsock CID")
    return tuple(merged.values())


def build_config(
    *,
    file_settings: dict[str, Any],
    run_dir: Path | str | None,
    budget: str | None,
    guest_specs: list[str],
    guest_cids: list[str],
    compress: bool | None,
    nbd_size: str | None,
    vsock_port: int | None,
    log_level: str | None,
    log_format: str | None,
    state_dir: Path | str | None = None,
    journal: bool | None = None,
    durability: str | None = None,
    preallocate: bool | None = None,
    journal_reserve: str | None = None,
    socket_group: str | None = None,
    connections_per_guest: int | None = None,
    handshake_timeout: float | None = None,
    idle_timeout: float | None = None,
    remote: str | None = None,
    remote_replicas: int | None = None,
    remote_wait: float | None = None,
    remote_budget: str | None = None,
    remote_read_ahead: int | None = None,
    host_id: str | None = None,
    fallback_iops: int | None = None,
    encoder_threads: int | None = None,
) -> DaemonConfig:
    """Merge the TOML settings with command-line values (which take precedence;
    None: not given on the command line)."""
    unknown = set(file_settings) - _FILE_KEYS
    if unknown:
        raise ConfigError(f"unknown config keys: {_shown(sorted(unknown))}")
    settings = file_settings

    run_dir_value, run_dir_name = _pick(settings, "run_dir", run_dir)
    if run_dir_value is None:
        raise ConfigError("no run directory: pass --run-dir or set run_dir in the config")
    budget_value, budget_name = _pick(settings, "budget", budget)
    if budget_value is None:
        raise ConfigError("no budget: pass --budget or set budget in the config")
    port, port_name = _pick(settings, "vsock_port", vsock_port)
    state, state_name = _pick(settings, "state_dir", state_dir)
    group, group_name = _pick(settings, "socket_group", socket_group)
    seeds, seeds_name = _pick(settings, "remote", remote)
    remote_budget_value, remote_budget_name = _pick(settings, "remote_budget", remote_budget)
    host, host_name = _pick(settings, "host_id", host_id, socket.gethostname())
    if not isinstance(host, str) or not _GUEST_NAME_RE.match(host):
        _fail(host_name, "a name of letters, digits, '_', '.', '-'", host)
    guests = _merge_guests(settings.get("guest", []), guest_specs, guest_cids)
    if seeds is None and (demoting := [g.name for g in guests if g.remote_ephemeral]):
        raise ConfigError(f"guest(s) {_shown(demoting)} have remote-ephemeral but there is no "
                          "remote tier (--remote)")
    level = (_durability(journal, durability, "--no-journal", "--durability")
             or _durability(settings.get("journal"), settings.get("durability"),
                            "journal = false", "durability")
             or _DEFAULTS.durability)
    return DaemonConfig(
        run_dir=check_path(run_dir_value, run_dir_name),
        budget_bytes=parse_size(budget_value, budget_name, minimum=PAGE_SIZE),
        guests=guests,
        compress=check_bool(*_pick(settings, "compress", compress, _DEFAULTS.compress)),
        nbd_size_bytes=parse_size(*_pick(settings, "nbd_size", nbd_size, _DEFAULTS.nbd_size_bytes),
                                  minimum=PAGE_SIZE, maximum=MAX_FILE_BYTES, multiple=PAGE_SIZE),
        vsock_port=None if port is None else check_int(port, port_name, 1, MAX_VSOCK_ID),
        log_level=check_choice(*_pick(settings, "log_level", log_level, _DEFAULTS.log_level),
                               LOG_LEVELS),
        log_format=check_choice(*_pick(settings, "log_format", log_format, _DEFAULTS.log_format),
                                LOG_FORMATS),
        state_dir=None if state is None else check_path(state, state_name),
        durability=level,
        preallocate=check_bool(*_pick(settings, "preallocate", preallocate,
                                      _DEFAULTS.preallocate)),
        journal_reserve_bytes=parse_size(
            *_pick(settings, "journal_reserve", journal_reserve, _DEFAULTS.journal_reserve_bytes),
            maximum=MAX_FILE_BYTES),
        socket_group=None if group is None else check_group(group, group_name),
        connections_per_guest=check_int(
            *_pick(settings, "connections_per_guest", connections_per_guest,
                   _DEFAULTS.connections_per_guest), 1, 1024),
        handshake_timeout_s=check_seconds(
            *_pick(settings, "handshake_timeout", handshake_timeout,
                   _DEFAULTS.handshake_timeout_s), 3600),
        idle_timeout_s=check_seconds(
            *_pick(settings, "idle_timeout", idle_timeout, _DEFAULTS.idle_timeout_s), 86400),
        remote_seeds=None if seeds is None else parse_remote_seeds(seeds, seeds_name),
        remote_replicas=check_int(*_pick(settings, "remote_replicas", remote_replicas,
                                         _DEFAULTS.remote_replicas), 0, MAX_REMOTE_REPLICAS),
        remote_wait_s=check_seconds(
            *_pick(settings, "remote_wait", remote_wait, _DEFAULTS.remote_wait_s), 3600),
        remote_budget_bytes=(None if remote_budget_value is None else
                             parse_cap(remote_budget_value, remote_budget_name)),
        remote_read_ahead=check_int(*_pick(settings, "remote_read_ahead", remote_read_ahead,
                                           _DEFAULTS.remote_read_ahead), 0, MAX_REMOTE_READ_AHEAD),
        host_id=host,
        fallback_iops=check_int(*_pick(settings, "fallback_iops", fallback_iops, _DEFAULTS.fallback_iops),
                                0, 1_000_000),
        encoder_threads=check_int(*_pick(settings, "encoder_threads", encoder_threads,
                                         _DEFAULTS.encoder_threads), 0, MAX_ENCODER_THREADS),
    )
