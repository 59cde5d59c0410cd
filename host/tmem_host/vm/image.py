"""The guest image cache: ~/.cache/tmem-testbed/images/<recipe hash>/.

`python -m tmem_host.vm.image build|status|prune` (`make image` builds). The recipe
(tmem_host.vm.recipe and the files in images/, documentation aside) is hashed; the
hash names the cache directory holding vmlinuz (Debian's kernel as packaged),
vmlinux (the same kernel decompressed, booted through its PVH entry: under TCG that
skips seconds of firmware and decompression), initrd.img, probe-initrd.img,
rootfs.ext4 and manifest.json. A build happens in a scratch directory next to it
and is renamed into place under a lock, so concurrent builders neither race nor
leave half an image behind, and require_image() waits for a build in progress.
The agent (guest/, wire/) is not part of the image: the launcher shares it
read-only over 9p at boot.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmem_host.vm import recipe
from tmem_host.vm.recipe import HOST_BUSYBOX, RECIPE_DIR, REPO_ROOT, Builder, ImageError, Progress

__all__ = ["GuestImage", "ImageError", "cache_root", "cached_image", "images_dir",
           "recipe_hash", "require_image", "build_image", "prune_images"]


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
    return [*files, Path(recipe.__file__).resolve()]


def recipe_hash(extra_packages: Sequence[str] = ()) -> str:
    """Hash of the recipe: file names, modes and contents, and the extra packages a
    scenario adds (its command workload's), if any (16 hex digits)."""
    digest = hashlib.sha256()
    for path in recipe_files():
        name = path.relative_to(REPO_ROOT).as_posix()
        digest.update(f"{name}\0{path.stat().st_mode & 0o777:o}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    if extra_packages:
        digest.update(("extra-packages\0" + "\0".join(sorted(set(extra_packages)))).encode())
    return digest.hexdigest()[:16]


def cached_image(extra_packages: Sequence[str] = ()) -> GuestImage | None:
    """The image built from the current recipe, or None when it needs building."""
    directory = images_dir() / recipe_hash(extra_packages)
    if not (directory / "manifest.json").is_file():
        return None
    return GuestImage.load(directory)


def require_image(extra_packages: Sequence[str] = ()) -> GuestImage:
    """The current image; waits for a build in progress, raises ImageError if none."""
    image = cached_image(extra_packages)
    if image is None and images_dir().is_dir():
        with build_lock():  # a running build holds it until its image is in place
            image = cached_image(extra_packages)
    if image is None:
        raise ImageError(
            f"no guest image for recipe {recipe_hash(extra_packages)} in {images_dir()}: "
            "run `make image` (python -m tmem_host.vm.image build)"
        )
    return image


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


def build_image(force: bool = False, progress: Progress | None = None,
                extra_packages: Sequence[str] = ()) -> GuestImage:
    """Build the image for the current recipe (plus ``extra_packages``) unless it
    is cached (or force)."""
    if os.geteuid() != 0:
        raise ImageError("building the guest image needs root (debootstrap, chroot, mknod)")
    for tool in ("debootstrap", "chroot", "apt-get", "dpkg-deb", "cpio", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise ImageError(f"{tool} is missing: install ci/system-packages.txt")
    if not HOST_BUSYBOX.is_file():
        raise ImageError(f"{HOST_BUSYBOX} is missing: apt-get install busybox-static")
    images_dir().mkdir(parents=True, exist_ok=True)
    with build_lock():
        digest = recipe_hash(extra_packages)
        final = images_dir() / digest
        if final.exists():
            if not force:
                return GuestImage.load(final)
            shutil.rmtree(final)
        progress = progress or make_progress(recipe.STEPS)
        with scratch_dir(images_dir(), digest) as scratch:
            builder = Builder(scratch, progress, deb_cache=cache_root() / "debootstrap-debs",
                              extra_packages=extra_packages)
            recipe.build_into(builder, digest)
            builder.output.rename(final)
        progress.close()
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
