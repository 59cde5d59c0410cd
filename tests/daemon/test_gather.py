"""The gather forms of the page-carrying batch payloads give the codec's exact bytes."""

from __future__ import annotations

import random

import pytest

from tmem_host.daemon.gather import get_batch_reply_chunks, put_batch_chunks
from tmem_wire.abi import Status, encode_batch_reply, encode_put_batch


@pytest.mark.parametrize("count", [1, 7, 64])
@pytest.mark.parametrize("page_shift", [12, 13])
def test_gather_forms_match_the_codec(count: int, page_shift: int) -> None:
    rng = random.Random(count * page_shift)
    keys = [((rng.randrange(1 << 64), 1, 2), rng.randrange(1 << 40)) for _ in range(count)]
    pages = [rng.randbytes(1 << page_shift) for _ in range(count)]
    assert b"".join(put_batch_chunks(page_shift, keys, pages)) == encode_put_batch(
        page_shift, keys, pages)
    statuses = [rng.choice([Status.OK, Status.MISS, Status.INVALID]) for _ in range(count)]
    hits = [page for page, status in zip(pages, statuses) if status == Status.OK]
    assert b"".join(get_batch_reply_chunks(statuses, hits, page_shift)) == encode_batch_reply(
        statuses, hits, page_shift=page_shift)


def test_gather_forms_check_the_pages() -> None:
    with pytest.raises(ValueError):
        put_batch_chunks(12, [((0, 0, 0), 0)], [bytes(100)])
    with pytest.raises(ValueError):
        get_batch_reply_chunks([Status.OK, Status.OK], [bytes(4096)], 12)
