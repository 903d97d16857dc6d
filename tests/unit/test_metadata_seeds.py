"""meta_data.json's random_seed: base64 of 512 random bytes, never the same twice, also not
in two forked workers that inherited one buffer."""

from __future__ import annotations

import base64
import os

from openimds.metadata.api import SEED_BATCH, SEED_BYTES, _Seeds


def test_seeds_are_512_bytes_and_never_repeat() -> None:
    seeds = _Seeds()
    got = [seeds.take() for _ in range(3 * SEED_BATCH + 5)]  # across refills
    assert len(set(got)) == len(got)
    assert all(len(base64.b64decode(s, validate=True)) == SEED_BYTES for s in got)


def test_a_forked_child_does_not_answer_its_parents_seeds() -> None:
    seeds = _Seeds()
    seeds.take()  # the buffer is drawn: both sides would slice the same bytes next
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(w, b"".join(seeds.take() for _ in range(4)))
        finally:
            os._exit(0)
    os.close(w)
    child = b""
    while chunk := os.read(r, 65536):
        child += chunk
    os.close(r)
    os.waitpid(pid, 0)
    ours = b"".join(seeds.take() for _ in range(4))
    assert len(child) == len(ours)
    size = len(ours) // 4
    theirs = {child[i:i + size] for i in range(0, len(child), size)}
    assert not theirs & {ours[i:i + size] for i in range(0, len(ours), size)}
