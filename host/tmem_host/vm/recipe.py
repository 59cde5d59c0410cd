"""The guest image recipe: what goes into the image and how it is built.

This module and the files in images/ (documentation aside) are the recipe: their
hash names the image in the cache (tmem_host.vm.image), so a change here rebuilds
the image and nothing else does. The steps: debootstrap a minbase bookworm root
from the host's mirror, add the exact Debian kernel package linux-image-amd64
depends on (plus a decompressed vmlinux for PVH boot), prune modules, depmod,
fetch the upstream tarballs of sources.txt (checked against the suite's Sources
index) into /opt/tmem/src, overlay images/rootfs, build the busybox initramfs and the KVM probe initramfs,
and mkfs.ext4 -d the root.
"""
from __future__ import annotations

import bz2
import datetime
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPE_DIR = REPO_ROOT / "images"
SUITE = "bookworm"
ROOT_LABEL = "tmemroot"
KERNEL_META_PACKAGE = "linux-image-amd64"
HOST_BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: no shared libraries
PROBE_MARKER = "TMEM-PROBE-OK"
READY_MARKER = "TMEM-GUEST-READY"
# Free space left in the root file system beyond its contents (writes go to the
# snapshot overlay, but package installs in a guest should still fit).
ROOTFS_HEADROOM_BYTES = 768 << 20


class ImageError(Exception):
    """The guest image is missing or could not be built; the message says why."""


class Progress(Protocol):
    def step(self, description: str) -> None: ...

    def close(self) -> None: ...


def read_list(name: str) -> list[str]:
    """A recipe list file: one entry a line, '#' comments."""
    lines = (RECIPE_DIR / name).read_text().splitlines()
    return [entry for entry in (line.split("#", 1)[0].strip() for line in lines) if entry]


def parse_stanza(stanza: str) -> dict[str, str]:
    """One deb822 stanza: lower-case field names; a folded field's lines joined by newlines."""
    fields: dict[str, str] = {}
    name = None
    for line in stanza.splitlines():
        if line.startswith((" ", "\t")) and name is not None:
            fields[name] += "\n" + line.strip()
        elif ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            name = key.strip().lower()
            fields[name] = value.strip()
    return fields


def host_debian_mirror(
    sources_dir: Path = Path("/etc/apt/sources.list.d"),
    sources_list: Path = Path("/etc/apt/sources.list"),
) -> str:
    """The URI of the host's apt source for the bookworm suite (deb822 or one-line)."""
    for sources in sorted(sources_dir.glob("*.sources")):
        for stanza in sources.read_text().split("\n\n"):
            fields = parse_stanza(stanza)
            types = fields.get("types", "").split()
            if "deb" in types and SUITE in fields.get("suites", "").split():
                return fields["uris"].split()[0]
    if sources_list.is_file():
        for line in sources_list.read_text().splitlines():
            words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    raise ImageError(f"no apt source for {SUITE} in {sources_dir} or {sources_list}")


# Compressed payloads a bzImage may carry, as scripts/extract-vmlinux looks for them.
KERNEL_PAYLOADS: tuple[tuple[bytes, Callable[[bytes], bytes]], ...] = (
    (b"\xfd7zXZ\x00", lambda data: lzma.LZMADecompressor().decompress(data)),
    (b"\x1f\x8b\x08", lambda data: zlib.decompressobj(31).decompress(data)),
    (b"BZh", lambda data: bz2.BZ2Decompressor().decompress(data)),
)
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU boots an ELF kernel through


def decompress_kernel(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage, or None when no known payload decodes to one."""
    for magic, decompress in KERNEL_PAYLOADS:
        offset = bzimage.find(magic)
        while offset >= 0:
            try:
                elf = decompress(bzimage[offset:])
            except (lzma.LZMAError, zlib.error, OSError, ValueError):
                elf = b""
            if elf.startswith(b"\x7fELF"):
                return elf
            offset = bzimage.find(magic, offset + 1)
    return None


def has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF has the Xen PVH entry note."""
    if elf[4] != 2 or elf[5] != 1:  # ELFCLASS64, ELFDATA2LSB
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        kind, _, offset, _, _, size = struct.unpack_from("<IIQQQQ", elf, phoff + index * phentsize)
        if kind != 4:  # PT_NOTE
            continue
        position, end = offset, offset + size
        while position + 12 <= end:
            name_size, desc_size, note_type = struct.unpack_from("<III", elf, position)
            name = elf[position + 12:position + 12 + name_size].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            position += 12 + (name_size + 3) // 4 * 4 + (desc_size + 3) // 4 * 4
    return False


class Builder:
    """Runs the build steps in a scratch directory; commands log to build.log."""

    def __init__(self, scratch: Path, progress: Progress, deb_cache: Path,
                 extra_packages: Sequence[str] = ()) -> None:
        self.scratch = scratch
        # A scenario's own packages (the command workload's), beside packages.txt.
        self.extra_packages = sorted(set(extra_packages))
        self.deb_cache = deb_cache
        self.root = scratch / "root"
        self.output = scratch / "output"
        self.output.mkdir()
        self.log_path = scratch / "build.log"
        self.progress = progress
        self.kernel_package_version = ""
        self.boot_kernel = "vmlinuz"

    def run(self, argv: Sequence[str], cwd: Path | None = None, capture: bool = False) -> str:
        with self.log_path.open("a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            completed = subprocess.run(
                list(argv), cwd=cwd, stdin=subprocess.DEVNULL, text=True,
                stdout=subprocess.PIPE if capture else log, stderr=log, check=False,
            )
        if completed.returncode != 0:
            tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-25:])
            raise ImageError(f"{' '.join(argv)} exited {completed.returncode}:\n{tail}")
        return completed.stdout if capture else ""

    def chroot(self, *argv: str, capture: bool = False) -> str:
        return self.run(["chroot", str(self.root), *argv], capture=capture)

    def debootstrap(self, mirror: str) -> None:
        packages = ",".join([*read_list("packages.txt"), *self.extra_packages])
        # Downloaded .debs are kept for the next build (debootstrap checks them
        # against the archive's checksums before use).
        self.deb_cache.mkdir(parents=True, exist_ok=True)
        self.run(["debootstrap", "--variant=minbase", f"--include={packages}",
                  "--components=main", f"--cache-dir={self.deb_cache}", SUITE, str(self.root),
                  mirror])

    def fetch_sources(self, mirror: str) -> dict[str, str]:
        """The upstream tarball of every package in sources.txt, checked against the
        SHA-256 the suite's Sources index gives (the index itself is signed through
        the Release file debootstrap checked; here its size and our hash stand in),
        cached beside the .debs, copied to /opt/tmem/src; returns name -> version."""
        wanted = read_list("sources.txt")
        if not wanted:
            return {}
        index = self.deb_cache / "Sources.xz"
        self._download(f"{mirror.rstrip('/')}/dists/{SUITE}/main/source/Sources.xz", index)
        stanzas = {}
        for stanza in lzma.decompress(index.read_bytes()).decode().split("\n\n"):
            fields = parse_stanza(stanza)
            if fields.get("package") in wanted:
                stanzas[fields["package"]] = fields
        target = self.root / "opt/tmem/src"
        target.mkdir(parents=True, exist_ok=True)
        versions = {}
        for package in wanted:
            found = stanzas.get(package)
            if found is None:
                raise ImageError(f"source package {package} is not in {SUITE}'s Sources index")
            tarballs = [line.split() for line in found["checksums-sha256"].splitlines()
                        if ".orig.tar." in line]
            if len(tarballs) != 1:
                raise ImageError(f"source package {package}: expected one .orig tarball, got {tarballs}")
            digest, size, name = tarballs[0]
            cached = self.deb_cache / name
            if not cached.is_file() or hashlib.sha256(cached.read_bytes()).hexdigest() != digest:
                self._download(f"{mirror.rstrip('/')}/{found['directory']}/{name}", cached)
            data = cached.read_bytes()
            if len(data) != int(size) or hashlib.sha256(data).hexdigest() != digest:
                cached.unlink()
                raise ImageError(f"{name}: size or SHA-256 differs from {SUITE}'s Sources index")
            shutil.copy2(cached, target / name)
            versions[package] = found["version"]
        return versions

    def _download(self, url: str, path: Path) -> None:
        with self.log_path.open("a") as log:
            log.write(f"GET {url}\n")
        temporary = path.with_suffix(path.suffix + ".part")
        try:
            with urllib.request.urlopen(url, timeout=120) as response, temporary.open("wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as error:
            raise ImageError(f"cannot download {url}: {error}") from None
        temporary.replace(path)

    def kernel_package(self) -> str:
        """The exact linux-image-6.1.0-N-amd64 the meta package depends on."""
        output = self.run(["apt-cache", "depends", KERNEL_META_PACKAGE], capture=True)
        for line in output.splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "Depends:" and words[1].startswith("linux-image-"):
                return words[1]
        raise ImageError(f"`apt-cache depends {KERNEL_META_PACKAGE}` names no kernel "
                         "(run apt-get update?)")

    def install_kernel(self, package: str) -> str:
        """Download the exact kernel package, unpack it, move it into the root."""
        debs = self.scratch / "debs"
        debs.mkdir()
        # Sandbox user root: _apt cannot write into this root-only scratch directory.
        self.run(["apt-get", "download", "-o", "APT::Sandbox::User=root", package], cwd=debs)
        (deb,) = debs.glob("*.deb")
        unpacked = self.scratch / "kernel"
        self.run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        (vmlinuz,) = (unpacked / "boot").glob("vmlinuz-*")
        kernel_version = vmlinuz.name.removeprefix("vmlinuz-")
        shutil.copy2(vmlinuz, self.output / "vmlinuz")
        elf = decompress_kernel(vmlinuz.read_bytes())
        if elf is not None and has_pvh_entry(elf):
            (self.output / "vmlinux").write_bytes(elf)
            self.boot_kernel = "vmlinux"
        # Moved by hand: unpacking over the usrmerged root's /lib symlink is unsafe.
        modules = self.root / "usr/lib/modules"
        modules.mkdir(parents=True, exist_ok=True)
        (unpacked / "lib/modules" / kernel_version).rename(modules / kernel_version)
        self.kernel_package_version = self.run(
            ["dpkg-deb", "-f", str(deb), "Version"], capture=True).strip()
        return kernel_version

    def prune_modules(self, kernel_version: str) -> None:
        tree = self.root / "usr/lib/modules" / kernel_version / "kernel"
        for relative in read_list("prune-modules.txt"):
            shutil.rmtree(tree / relative, ignore_errors=True)
        self.chroot("depmod", kernel_version)

    def configure_root(self, kernel_version: str) -> None:
        overlay = RECIPE_DIR / "rootfs"
        for source in sorted(overlay.rglob("*")):
            target = self.root / source.relative_to(overlay)
            if source.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        # Host keys baked in would be shared by every guest: init makes one per boot.
        for key in (self.root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        (self.root / "etc/hostname").write_text("tmem-guest\n")
        (self.root / "etc/hosts").write_text("127.0.0.1 localhost tmem-guest\n")
        (self.root / "etc/fstab").write_text("# the tmem init mounts everything\n")
        (self.root / "opt/tmem/guest").mkdir(parents=True, exist_ok=True)
        (self.root / "opt/tmem/wire").mkdir(parents=True, exist_ok=True)
        (self.root / "boot").mkdir(exist_ok=True)
        shutil.copy2(self.output / "vmlinuz", self.root / "boot" / f"vmlinuz-{kernel_version}")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (self.root / cache).glob("*"):
                if item.is_file():
                    item.unlink()

    def initramfs_modules(self, kernel_version: str) -> list[Path]:
        """Module files for the initramfs, dependencies first, each once."""
        ordered: list[Path] = []
        for module in read_list("initramfs-modules.txt"):
            output = self.chroot("modprobe", "-S", kernel_version, "--show-depends", module,
                                 capture=True)
            for line in output.splitlines():
                words = line.split()
                if words and words[0] == "insmod":
                    path = self.root / words[1].lstrip("/")
                    if path not in ordered:
                        ordered.append(path)
        return ordered

    def write_initramfs(self, target: Path, init_script: Path, modules: list[Path]) -> None:
        staging = Path(tempfile.mkdtemp(dir=self.scratch, prefix="initramfs-"))
        for directory in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
            (staging / directory).mkdir(parents=True)
        os.mknod(staging / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
        shutil.copy2(HOST_BUSYBOX, staging / "bin/busybox")
        shutil.copy2(init_script, staging / "init")
        for module in modules:
            shutil.copy2(module, staging / "lib/modules" / module.name)
        (staging / "lib/modules/modules.order").write_text(
            "".join(f"{module.name}\n" for module in modules))
        names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
        archive = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=staging,
            input="\n".join(names).encode(), capture_output=True, check=False,
        )
        if archive.returncode != 0:
            raise ImageError(f"cpio failed: {archive.stderr.decode(errors='replace')}")
        with gzip.GzipFile(target, "wb", compresslevel=9, mtime=0) as compressed:
            compressed.write(archive.stdout)

    def make_rootfs(self) -> int:
        used = int(self.run(["du", "-sb", str(self.root)], capture=True).split()[0])
        size = (used + ROOTFS_HEADROOM_BYTES + (64 << 20) - 1) // (64 << 20) * (64 << 20)
        self.run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", str(self.root),
                  str(self.output / "rootfs.ext4"), str(size // 1024) + "k"])
        return size

    def package_versions(self) -> dict[str, str]:
        output = self.chroot("dpkg-query", "-W", "-f", "${Package} ${Version}\n", capture=True)
        return dict(line.split(" ", 1) for line in output.splitlines() if " " in line)


STEPS = 10


def build_into(builder: Builder, digest: str) -> None:
    """Run every step; leaves vmlinuz, vmlinux, the initramfs images, rootfs.ext4 and
    manifest.json in builder.output."""
    progress = builder.progress
    mirror = host_debian_mirror()
    progress.step(f"debootstrap {SUITE} from {mirror}")
    builder.debootstrap(mirror)
    progress.step("fetching source tarballs (sources.txt)")
    sources = builder.fetch_sources(mirror)
    progress.step("resolving the kernel package")
    package = builder.kernel_package()
    progress.step(f"installing {package}")
    kernel_version = builder.install_kernel(package)
    progress.step("pruning modules and running depmod")
    builder.prune_modules(kernel_version)
    progress.step("configuring the root (init, sshd, sysctls)")
    builder.configure_root(kernel_version)
    progress.step("building the initramfs")
    builder.write_initramfs(builder.output / "initrd.img", RECIPE_DIR / "initramfs/init",
                            builder.initramfs_modules(kernel_version))
    progress.step("building the accelerator probe initramfs")
    builder.write_initramfs(builder.output / "probe-initrd.img",
                            RECIPE_DIR / "initramfs/probe-init", [])
    progress.step("collecting versions")
    manifest: dict[str, Any] = {
        "recipe_hash": digest,
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "suite": SUITE,
        "mirror": host_debian_mirror(),
        "kernel_package": package,
        "kernel_package_version": builder.kernel_package_version,
        "kernel_version": kernel_version,
        "boot_kernel": builder.boot_kernel,
        "root_label": ROOT_LABEL,
        "ready_marker": READY_MARKER,
        "probe_marker": PROBE_MARKER,
        "packages": builder.package_versions(),
        "sources": sources,
        "extra_packages": builder.extra_packages,
    }
    progress.step("making rootfs.ext4 (mkfs.ext4 -d)")
    manifest["rootfs_bytes"] = builder.make_rootfs()
    (builder.output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
