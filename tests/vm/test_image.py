"""The image recipe's hash, the host mirror lookup, and the kernel the guests boot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tmem_host.vm import image as image_module
from tmem_host.vm import recipe as recipe_module
from tmem_host.vm.image import GuestImage, recipe_files, recipe_hash
from tmem_host.vm.recipe import ImageError, decompress_kernel, has_pvh_entry, host_debian_mirror

pytestmark = pytest.mark.vm


def test_recipe_is_images_and_the_recipe_code_only() -> None:
    repo = recipe_module.REPO_ROOT
    names = [path.relative_to(repo).parts[0] for path in recipe_files()]
    assert set(names) == {"images", "host"}
    assert [p for p in recipe_files() if p.parts[-4:-1] == ("host", "tmem_host", "vm")] == [
        Path(recipe_module.__file__).resolve()]
    assert all(path.suffix != ".md" for path in recipe_files())


def test_recipe_hash_follows_recipe_contents_but_not_documentation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A copy of the recipe (images/ and the recipe code) in a scratch repository.
    recipe = tmp_path / "images"
    shutil.copytree(recipe_module.RECIPE_DIR, recipe)
    code = tmp_path / Path(recipe_module.__file__).resolve().relative_to(recipe_module.REPO_ROOT)
    code.parent.mkdir(parents=True)
    shutil.copy2(recipe_module.__file__, code)
    monkeypatch.setattr(image_module, "RECIPE_DIR", recipe)
    monkeypatch.setattr(image_module, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(recipe_module, "__file__", str(code))
    original = recipe_hash()
    (recipe / "README.md").write_text("rewritten documentation\n")
    assert recipe_hash() == original
    with (recipe / "packages.txt").open("a") as packages:
        packages.write("strace\n")
    changed = recipe_hash()
    assert changed != original
    (recipe / "initramfs/init").chmod(0o644)  # modes are part of the recipe too
    assert recipe_hash() not in (original, changed)
    moded = recipe_hash()
    with code.open("a") as recipe_code:
        recipe_code.write("# a change to the recipe code\n")
    assert recipe_hash() not in (original, changed, moded)


def test_host_mirror_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    sources_dir = tmp_path / "sources.list.d"
    sources_dir.mkdir()
    (sources_dir / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb deb-src\n# comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert host_debian_mirror(sources_dir, tmp_path / "none") == "http://mirror.example/debian"
    (sources_dir / "debian.sources").unlink()
    one_line = tmp_path / "sources.list"
    one_line.write_text("# deb http://old.example/debian bookworm main\n"
                        "deb [arch=amd64] http://line.example/debian bookworm main\n")
    assert host_debian_mirror(sources_dir, one_line) == "http://line.example/debian"
    one_line.write_text("deb http://line.example/debian trixie main\n")
    with pytest.raises(ImageError, match="no apt source for bookworm"):
        host_debian_mirror(sources_dir, one_line)


def test_guests_boot_the_decompressed_debian_kernel(image: GuestImage) -> None:
    vmlinuz = image.directory / "vmlinuz"
    assert image.kernel.name == image.manifest["boot_kernel"]
    elf = decompress_kernel(vmlinuz.read_bytes())
    assert elf is not None and has_pvh_entry(elf)
    if image.manifest["boot_kernel"] == "vmlinux":
        assert image.kernel.read_bytes() == elf
    assert decompress_kernel(b"not a kernel" * 100) is None
    assert image.manifest["kernel_package"] == f"linux-image-{image.kernel_version}"
