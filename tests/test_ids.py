"""Receipt ids: canonical version-7 UUIDs that sort by creation time."""

from __future__ import annotations

import os
import time
import uuid

from iii_embedded._ids import new_receipt_id


def test_receipt_ids_are_canonical_version_7_uuids_with_the_current_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    rid = new_receipt_id()
    after = time.time_ns() // 1_000_000
    parsed = uuid.UUID(rid)
    assert str(parsed) == rid
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert before <= parsed.int >> 80 <= after


def test_receipt_ids_are_unique_and_ordered_across_milliseconds() -> None:
    first = [new_receipt_id() for _ in range(20_000)]
    assert len(set(first)) == len(first)
    last_ms = uuid.UUID(max(first)).int >> 80
    while time.time_ns() // 1_000_000 <= last_ms:  # until the clock reaches a later ms
        pass
    later = new_receipt_id()
    assert later > max(first)


def test_forked_child_draws_different_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.write(write, new_receipt_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    parent = new_receipt_id()
    assert uuid.UUID(child).version == 7
    assert child[14:] != parent[14:]  # the random parts differ


def test_every_random_digit_varies_and_the_variant_digit_is_rfc_9562() -> None:
    ids = [new_receipt_id() for _ in range(2_000)]
    assert {rid[19] for rid in ids} == set("89ab")  # variant 10, then two random bits
    assert {rid[14] for rid in ids} == {"7"}
    for position in [15, 16, 17, 20, 21, 22, *range(24, 36)]:
        seen = {rid[position] for rid in ids}
        assert len(seen) == 16, (position, seen)
