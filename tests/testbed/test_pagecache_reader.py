"""The page-cache workload's checksummed reader, on the host: it reads back what
`prepare` wrote, and names a corrupted, truncated or swapped page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tmem_workloads import pagecache
from tmem_workloads.usemem import PAGE_SIZE

MIB = 3
FILE_MIB = 2  # two files: 2 MiB and 1 MiB


@pytest.fixture
def file_set(tmp_path: Path) -> Path:
    directory = tmp_path / "set"
    prepared = pagecache.prepare(directory, MIB, file_mib=FILE_MIB, seed=7, drop_caches=False)
    assert prepared["files"] == 2 and prepared["pages"] == MIB * 256
    return directory


def read(directory: Path, passes: int = 1) -> dict[str, object]:
    return pagecache.read(directory, MIB, file_mib=FILE_MIB, seed=7, passes=passes)


def test_an_intact_set_verifies_on_every_pass(file_set: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sorted(p.name for p in file_set.iterdir()) == ["f0000", "f0001"]
    assert (file_set / "f0001").stat().st_size == 1 << 20
    pages = [(file_set / "f0000").read_bytes()[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(256)]
    assert len(set(pages)) == 256  # every page distinct (stamped)
    code = pagecache.main(["read", "--dir", str(file_set), "--mib", str(MIB), "--file-mib", str(FILE_MIB),
                           "--seed", "7", "--passes", "2"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["verified"] is True and result["bad_pages"] == 0
    assert result["bytes"] == 2 * MIB << 20 and len(result["pass_s"]) == 2


def test_a_corrupted_page_is_caught_and_named(file_set: Path) -> None:
    with open(file_set / "f0001", "r+b") as handle:
        handle.seek(5 * PAGE_SIZE + 100)
        handle.write(b"\xff")
    result = read(file_set, passes=2)
    assert result["verified"] is False
    assert result["first_bad_pages"] == ["f0001:5", "f0001:5"]  # once per pass


def test_another_files_page_or_a_short_file_is_caught(file_set: Path) -> None:
    first, second = (file_set / "f0000").read_bytes(), bytearray((file_set / "f0001").read_bytes())
    second[:PAGE_SIZE] = first[:PAGE_SIZE]  # same page number, wrong file: only the stamp differs
    (file_set / "f0001").write_bytes(bytes(second[: -PAGE_SIZE]))
    result = read(file_set)
    assert result["first_bad_pages"] == ["f0001:0", "f0001:size 255 pages, expected 256"]


def test_a_different_seed_reads_as_all_bad(file_set: Path) -> None:
    result = pagecache.read(file_set, MIB, file_mib=FILE_MIB, seed=8, passes=1)
    assert result["bad_pages"] == MIB * 256
