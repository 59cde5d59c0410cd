"""The guest image: recipe hash, cache, and the build (`python -m tmem_host.vm.image build`).

The recipe is the files in images/ plus this module's source. Its hash names the
cache directory ~/.cache/tmem-testbed/images/<hash>/ holding vmlinuz (Debian's
kernel as packaged), vmlinux (the same kernel decompressed, booted through its PVH
entry: under TCG that skips seconds of firmware and decompression), initrd.img,
probe-initrd.img, rootfs.ext4 and manifest.json. A build happens in a temporary
directory next to it and is renamed into place, under a lock, so concurrent
builders neither race nor leave half an image behind. The agent (guest/, wire/)
is not part of the image: the launcher shares it read-only over 9p at boot.
"""
from __future__ import annotations

import argparse
import bz2
import contextlib
import datetime
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built image in the cache."""

    directory: Path
    kernel: Path  # what QEMU boots: vmlinux (PVH) when the kernel has the entry, else vmlinuz
    initrd: Path
    probe_initrd: Path
    rootfs: Path
    manifest: dict[str, Any]

    @property
    def kernel_version(self) -> str:
        return str(self.manifest["kernel_version"])

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        manifest = json.loads((directory / "manifest.json").read_text())
        return cls(
            directory=directory,
            kernel=directory / manifest["boot_kernel"],
            initrd=directory / "initrd.img",
            probe_initrd=directory / "probe-initrd.img",
            rootfs=directory / "rootfs.ext4",
            manifest=manifest,
        )


def cache_root() -> Path:
    """~/.cache/tmem-testbed, or under $XDG_CACHE_HOME when set."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tmem-testbed"


def images_dir() -> Path:
    return cache_root() / "images"


def recipe_files() -> list[Path]:
    """The files whose contents decide the image (documentation does not)."""
    files = sorted(p for p in RECIPE_DIR.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".md")
    return [*files, Path(__file__).resolve()]


def recipe_hash() -> str:
    """Hash of the recipe: file names, modes and contents (16 hex digits)."""
    digest = hashlib.sha256()
    for path in recipe_files():
        name = path.relative_to(REPO_ROOT).as_posix()
        digest.update(f"{name}\0{path.stat().st_mode & 0o777:o}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def cached_image() -> GuestImage | None:
    """The image built from the current recipe, or None when it needs building."""
    directory = images_dir() / recipe_hash()
    if not (directory / "manifest.json").is_file():
        return None
    return GuestImage.load(directory)


def require_image() -> GuestImage:
    image = cached_image()
    if image is None:
        raise ImageError(
            f"no guest image for recipe {recipe_hash()} in {images_dir()}: "
            "run `make image` (python -m tmem_host.vm.image build)"
        )
    return image


class Progress(Protocol):
    def step(self, description: str) -> None: ...

    def close(self) -> None: ...


class PlainProgress:
    """One line per step, for logs and pipes."""

    def __init__(self, total_steps: int) -> None:
        self._total = total_steps
        self._done = 0

    def step(self, description: str) -> None:
        self._done += 1
        print(f"[image {self._done}/{self._total}] {description}", flush=True)

    def close(self) -> None:
        print("[image] done", flush=True)


class RichProgress:
    """A progress bar with the current step, on a terminal."""

    def __init__(self, total_steps: int) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
        )
        self._task = self._progress.add_task("guest image", total=total_steps)
        self._started = False
        self._progress.start()

    def step(self, description: str) -> None:
        if self._started:
            self._progress.advance(self._task)
        self._started = True
        self._progress.update(self._task, description=description)

    def close(self) -> None:
        self._progress.advance(self._task)
        self._progress.stop()


def make_progress(total_steps: int) -> Progress:
    if sys.stdout.isatty():
        return RichProgress(total_steps)
    return PlainProgress(total_steps)


def read_list(name: str) -> list[str]:
    """A recipe list file: one entry a line, '#' comments."""
    lines = (RECIPE_DIR / name).read_text().splitlines()
    return [entry for entry in (line.split("#", 1)[0].strip() for line in lines) if entry]


def host_debian_mirror(
    sources_dir: Path = Path("/etc/apt/sources.list.d"),
    sources_list: Path = Path("/etc/apt/sources.list"),
) -> str:
    """The URI of the host's apt source for the bookworm suite (deb822 or one-line)."""
    for sources in sorted(sources_dir.glob("*.sources")):
        for stanza in sources.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
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

    def __init__(self, scratch: Path, progress: Progress) -> None:
        self.scratch = scratch
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
        packages = ",".join(read_list("packages.txt"))
        # Downloaded .debs are kept for the next build (debootstrap checks them
        # against the archive's checksums before use).
        debs = cache_root() / "debootstrap-debs"
        debs.mkdir(parents=True, exist_ok=True)
        self.run(["debootstrap", "--variant=minbase", f"--include={packages}",
                  "--components=main", f"--cache-dir={debs}", SUITE, str(self.root), mirror])

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


STEPS = 9


def build_image(force: bool = False, progress: Progress | None = None) -> GuestImage:
    """Build the image for the current recipe unless it is cached (or force)."""
    if os.geteuid() != 0:
        raise ImageError("building the guest image needs root (debootstrap, chroot, mknod)")
    for tool in ("debootstrap", "chroot", "apt-get", "dpkg-deb", "cpio", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise ImageError(f"{tool} is missing: install ci/system-packages.txt")
    if not HOST_BUSYBOX.is_file():
        raise ImageError(f"{HOST_BUSYBOX} is missing: apt-get install busybox-static")
    images_dir().mkdir(parents=True, exist_ok=True)
    with build_lock():
        digest = recipe_hash()
        final = images_dir() / digest
        if final.exists():
            if not force:
                return GuestImage.load(final)
            shutil.rmtree(final)
        progress = progress or make_progress(STEPS)
        with scratch_dir(images_dir(), digest) as scratch:
            image = _build(Builder(scratch, progress), digest, final)
        progress.close()
        return image


def _build(builder: Builder, digest: str, final: Path) -> GuestImage:
    progress = builder.progress
    mirror = host_debian_mirror()
    progress.step(f"debootstrap {SUITE} from {mirror}")
    builder.debootstrap(mirror)
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
    }
    progress.step("making rootfs.ext4 (mkfs.ext4 -d)")
    manifest["rootfs_bytes"] = builder.make_rootfs()
    (builder.output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    builder.output.rename(final)
    return GuestImage.load(final)


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One builder at a time; the others wait, then find the image built."""
    with (images_dir() / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def scratch_dir(parent: Path, digest: str) -> Iterator[Path]:
    scratch = Path(tempfile.mkdtemp(dir=parent, prefix=f".build-{digest}-"))
    try:
        yield scratch
    finally:
        unmount_below(scratch)
        shutil.rmtree(scratch, ignore_errors=True)


def prune_images() -> list[Path]:
    """Remove cached images of other recipes (and leftover scratch directories)."""
    removed: list[Path] = []
    with build_lock():
        current = images_dir() / recipe_hash()
        for path in images_dir().iterdir():
            if path.is_dir() and path != current:
                unmount_below(path)
                shutil.rmtree(path)
                removed.append(path)
    return removed


def unmount_below(directory: Path) -> None:
    """Unmount anything a failed debootstrap left mounted (proc, sys) before removal."""
    prefix = str(directory.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount_point in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", mount_point], check=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tmem_host.vm.image",
                                     description="The tmem-testbed guest image.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the image unless it is cached")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    commands.add_parser("status", help="print the recipe hash and the cached image, if any")
    commands.add_parser("prune", help="remove cached images of other recipes")
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "build":
            image = build_image(force=arguments.force)
            print(f"guest image {image.directory} (kernel {image.kernel_version})")
        elif arguments.command == "prune":
            images_dir().mkdir(parents=True, exist_ok=True)
            for path in prune_images():
                print(f"removed {path}")
        else:
            cached = cached_image()
            print(f"recipe {recipe_hash()}: "
                  + (f"cached at {cached.directory}" if cached else "not built"))
            return 0 if cached else 1
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
