"""PUT_BATCH pages encoded ahead on tmemd's encoder threads (docs/PERFORMANCE.md):
requests sent together still apply in order, whoever encoded their pages."""

from __future__ import annotations

import pytest

from tmem_host.bench import mixed_pages
from tmem_host.daemon.client import AbiClient
from tmem_host.daemon.process import StartTmemd
from tmem_wire.abi import Hello, Key, Op, Status, decode_batch_reply, encode_key_batch

KEYS: list[Key] = [((9, 0, 0), index) for index in range(64)]


ROUNDS = 8


@pytest.mark.parametrize(("threads", "guest"), [("1", "g1"), ("0", "g1"), ("1", "g1:dedup")],
                         ids=["encoder-thread", "no-encoder-thread", "dedup-pool"])
def test_batches_sent_together_apply_in_order(start_tmemd: StartTmemd, threads: str, guest: str) -> None:
    """Two PUT_BATCHes of the same keys, gets, a flush and a third PUT_BATCH, all in
    one send: every get sees exactly the writes before it, never a later one's
    pages or an earlier, overwritten one's."""
    daemon = start_tmemd(guests=(guest,), extra_args=("--encoder-threads", threads))
    first, second = mixed_pages(64), mixed_pages(64, seed=7)
    assert first != second
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        pool_id, _ = client.new_pool()
        for _ in range(ROUNDS):
            puts = [client.submit_put_batch(pool_id, KEYS, first),
                    client.submit_put_batch(pool_id, KEYS, second)]
            after_two = client.submit_get_batch(pool_id, KEYS)
            flush = client.submit(Op.FLUSH_BATCH, pool_id=pool_id, payload=encode_key_batch(KEYS[:8]))
            puts.append(client.submit_put_batch(pool_id, KEYS[:32], first[:32]))
            after_three = client.submit_get_batch(pool_id, KEYS)
            for request_id in [*puts, flush]:
                reply = client.reply(request_id)
                assert reply.status == Status.OK and set(decode_batch_reply(reply.payload)[0]) == {Status.OK}
            assert client.get_batch_reply(after_two)[1] == second
            assert client.get_batch_reply(after_three)[1] == first[:32] + second[32:]
        with daemon.control() as control:
            (connection,) = control.request("stats")["connections"]
    # With a thread, the batches behind the one a pass serves first are encoded
    # ahead (how many depends on how the reads cut the stream); a dedup pool
    # hashes the raw page first, so never.
    if (threads, guest) == ("1", "g1"):
        assert 0 < connection["encoded_ahead"] <= 2 * ROUNDS
    else:
        assert connection["encoded_ahead"] == 0
    assert connection["errors"] == 0


def test_a_batch_refused_in_its_turn_is_refused_whoever_saw_it_first(start_tmemd: StartTmemd) -> None:
    """A PUT_BATCH over the negotiated batch size, sent behind good ones, is
    INVALID in its turn and stores nothing; the ones around it are stored."""
    daemon = start_tmemd(guests=("g1",))
    pages = mixed_pages(48)
    with AbiClient(daemon.abi_socket("g1")) as client:
        client.hello(Hello(max_batch_pages=16))
        pool_id, _ = client.new_pool()
        for _ in range(ROUNDS):
            first = client.submit_put_batch(pool_id, KEYS[:16], pages[:16])
            too_big = client.submit_put_batch(pool_id, KEYS[16:48], pages[16:48])
            last = client.submit_put_batch(pool_id, KEYS[32:48], pages[32:48])
            got = client.submit_get_batch(pool_id, KEYS[:16])
            got_rest = client.submit_get_batch(pool_id, KEYS[16:32])
            assert client.reply(first).status == Status.OK
            assert client.reply(too_big).status == Status.INVALID
            assert client.reply(last).status == Status.OK
            assert client.get_batch_reply(got)[1] == pages[:16]
            assert client.get_batch_reply(got_rest)[1] == [None] * 16  # never stored
        with daemon.control() as control:
            (connection,) = control.request("stats")["connections"]
    assert connection["errors"] == ROUNDS
    assert connection["encoded_ahead"] <= 2 * ROUNDS
