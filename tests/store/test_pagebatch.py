"""The C batch encoder (tmem_host.store._pagebatch): the same stored forms as
encode_page, page for page, and native threads that encode without the GIL."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmem_host.bench import mixed_pages
from tmem_host.store import PageEncoder, decode_page, decode_pages, encode_page, encode_pages
from tmem_host.store._pagebatch import Encoder

PAGE = 4096


def same_forms(batch: list[int | bytes], pages: list[bytes], page_size: int, compress: bool) -> None:
    """Each form follows encode_page's rules for its page and decodes to it: the
    same fill word, the raw page when not compressing. An lz4 block may differ
    from python-lz4's by a few bytes (pagecodec's docstring), so a page that lz4
    barely shrinks can be a block in one and raw in the other."""
    assert len(batch) == len(pages)
    for number, (form, page) in enumerate(zip(batch, pages)):
        expected = encode_page(page, page_size, compress)
        if isinstance(expected, int):
            assert form == expected, f"page {number}: fill word"
        else:
            assert isinstance(form, bytes) and len(form) <= page_size, f"page {number}: data"
            if len(form) == page_size or not compress:
                assert form == page, f"page {number}: raw"
            if len(expected) < page_size * 0.9:  # well compressible: a block in both
                assert len(form) < page_size, f"page {number}: an lz4 block"
        assert decode_page(form, page_size) == page, f"page {number} decodes to another page"


def test_a_batch_of_every_kind_of_page_gets_encode_pages_forms() -> None:
    pages = mixed_pages(256) + [bytes(PAGE), b"\xab" * PAGE, (7).to_bytes(8, "little") * (PAGE // 8),
                                os.urandom(PAGE), b"\x01" * 8 + bytes(PAGE - 8)]
    for compress in (True, False):
        same_forms(encode_pages(b"".join(pages), PAGE, compress), pages, PAGE, compress)
    assert encode_pages(b"", PAGE, True) == []
    # From a view into a bigger buffer, as a frame's payload is handed over.
    payload = memoryview(b"header" + b"".join(pages[:8]))[6:]
    same_forms(encode_pages(payload, PAGE, True), pages[:8], PAGE, True)


page_contents = st.one_of(
    st.binary(min_size=8, max_size=8).map(lambda word: word * (PAGE // 8)),  # fill
    st.binary(min_size=PAGE, max_size=PAGE),  # mostly incompressible
    st.tuples(st.binary(min_size=1, max_size=64), st.integers(0, PAGE - 1)).map(  # compressible
        lambda parts: ((parts[0] * PAGE)[: parts[1]] + bytes(PAGE))[:PAGE]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(page_contents, max_size=12), st.booleans())
def test_any_batch_gets_the_forms_encode_page_makes(pages: list[bytes], compress: bool) -> None:
    same_forms(encode_pages(b"".join(pages), PAGE, compress), pages, PAGE, compress)


@pytest.mark.parametrize("page_size", [16, 512, 8192, 65536])
def test_other_page_sizes(page_size: int) -> None:
    pages = [(page * (page_size // PAGE + 1))[:page_size] for page in mixed_pages(6)]
    pages += [bytes(page_size), b"\x5a" * page_size]
    same_forms(encode_pages(b"".join(pages), page_size, True), pages, page_size, True)


@settings(max_examples=60, deadline=None)
@given(st.lists(page_contents, max_size=12))
def test_decode_pages_gives_back_every_page(pages: list[bytes]) -> None:
    forms = [encode_page(page, PAGE, True) for page in pages]
    decoded = decode_pages(forms, PAGE)
    assert decoded == pages
    for form, page in zip(forms, decoded):  # a raw page is handed back as it is, not copied
        if isinstance(form, bytes) and len(form) == PAGE:
            assert page is form


@pytest.mark.parametrize("page_size", [16, 8192, 65536])
def test_decode_pages_other_page_sizes(page_size: int) -> None:
    pages = [(page * (page_size // PAGE + 1))[:page_size] for page in mixed_pages(6)]
    pages += [bytes(page_size), b"\x5a" * page_size, (3).to_bytes(8, "little") * (page_size // 8)]
    assert decode_pages(encode_pages(b"".join(pages), page_size, True), page_size) == pages


def test_decode_pages_refuses_what_is_not_a_stored_page() -> None:
    block = encode_page(mixed_pages(1)[0], PAGE, True)
    assert isinstance(block, bytes) and len(block) < PAGE
    with pytest.raises(ValueError, match="does not decode"):
        decode_pages([5, block[:-9]], PAGE)  # a cut block
    with pytest.raises(TypeError):
        decode_pages([bytes(PAGE + 1)], PAGE)
    with pytest.raises(TypeError):
        decode_pages(["page"], PAGE)  # type: ignore[list-item]
    assert decode_pages([], PAGE) == []


@pytest.mark.parametrize(("data", "page_size", "message"), [
    (bytes(PAGE + 1), PAGE, "not whole pages"),
    (bytes(PAGE), 8, "page size"),
    (bytes(PAGE), 4095, "page size"),
])
def test_what_is_not_whole_pages_is_refused(data: bytes, page_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_pages(data, page_size, True)
    with pytest.raises(ValueError, match=message):
        Encoder().submit(data, page_size, True)


@pytest.fixture
def encoder() -> Iterator[Encoder]:
    encoder = Encoder(threads=2)
    yield encoder
    encoder.close()


def test_jobs_come_back_as_their_own_pages(encoder: Encoder) -> None:
    pages = mixed_pages(64 * 16)
    batches = [pages[start:start + 64] for start in range(0, len(pages), 64)]
    jobs = [encoder.submit(b"".join(batch), PAGE, True) for batch in batches]
    for job, batch in reversed(list(zip(jobs, batches))):  # taken in any order
        same_forms(job.forms(), batch, PAGE, True)
        assert job.done()
        with pytest.raises(RuntimeError, match="taken already"):
            job.forms()


def test_the_threads_encode_while_the_caller_holds_the_gil(encoder: Encoder) -> None:
    """A job finishes while this thread runs Python and never lets the GIL go
    (the switch interval is set far beyond the test): the encoder's threads do
    not need it. A thread that did would wait here until the deadline."""
    pages = mixed_pages(2048)  # 8 MiB: milliseconds of lz4
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        job = encoder.submit(b"".join(pages), PAGE, True)
        deadline = time.perf_counter() + 20.0
        spins = 0
        while not job.done() and time.perf_counter() < deadline:
            spins += 1
    finally:
        sys.setswitchinterval(old_interval)
    assert job.done(), "the job did not finish while the GIL was held"
    assert spins > 0
    same_forms(job.forms(), pages, PAGE, True)


def test_a_job_holds_its_pages_until_taken(encoder: Encoder) -> None:
    pages = bytearray(b"".join(mixed_pages(64)))
    job = encoder.submit(pages, PAGE, True)
    with pytest.raises(BufferError):  # exported to the job: cannot be resized under it
        pages.extend(b"x")
    job.forms()
    pages.extend(b"x")  # released once taken


def test_closing_cancels_what_is_queued_and_is_idempotent() -> None:
    encoder = PageEncoder(threads=1)
    pages = b"".join(mixed_pages(512))
    jobs = [encoder.submit(pages, PAGE, True) for _ in range(32)]
    encoder.close()
    encoder.close()
    results = [job.result() for job in jobs]
    done = [result for result in results if result is not None]
    assert len(done) < len(jobs), "nothing was left queued to cancel"
    for result in done:  # what ran before the close is whole
        assert result.page_size == PAGE and result.compress
        assert [decode_page(form, PAGE) for form in result.forms[:4]] == mixed_pages(4)
    with pytest.raises(RuntimeError, match="closed"):
        encoder.submit(pages, PAGE, True)


def test_a_job_no_thread_started_can_be_taken_back() -> None:
    """What a session does when the event loop reaches a batch still queued
    behind other sessions' batches: it cancels it and encodes it itself."""
    pages = b"".join(mixed_pages(512))
    encoder = PageEncoder(threads=1)
    queued = [encoder.submit(pages, PAGE, True) for _ in range(16)]
    assert queued[-1].result() is None  # 15 batches ahead of it: cancelled, the caller encodes
    encoder.close()
    raw = Encoder(threads=1)
    jobs = [raw.submit(pages, PAGE, True) for _ in range(16)]
    deadline = time.monotonic() + 20
    while not jobs[0].done() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not jobs[0].cancel()  # finished: nothing to take back
    same_forms(jobs[0].forms(), mixed_pages(512), PAGE, True)
    assert jobs[-1].cancel()
    with pytest.raises(RuntimeError):
        jobs[-1].forms()
    raw.close()


def test_jobs_dropped_untaken_queued_or_running_free_cleanly() -> None:
    encoder = Encoder(threads=1)
    pages = b"".join(mixed_pages(1024))
    for _ in range(5):
        jobs = [encoder.submit(pages, PAGE, True) for _ in range(8)]
        del jobs  # some queued, one maybe running: unlinked or waited for
        gc.collect()
    job = encoder.submit(pages, PAGE, True)
    same_forms(job.forms(), mixed_pages(1024), PAGE, True)
    encoder.close()
    del encoder  # the job keeps the encoder alive: freed with it, after
    del job
    gc.collect()
