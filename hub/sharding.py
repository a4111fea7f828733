"""Which of several independent Redis instances carries a channel.

Rendezvous (highest random weight) hashing over the shard positions: every hub process and
every publisher given the same list of URLs, in the same order, picks the same shard for a
channel without talking to each other. Appending an N+1th shard moves only the channels whose
new winner is that shard, about 1/(N+1) of them; removing or reordering shards moves more.
"""

from __future__ import annotations

import hashlib

__all__ = ["shard_index"]


def shard_index(channel: str, shards: int) -> int:
    """Index in ``range(shards)`` of the shard that carries ``channel`` (stable across runs)."""
    if shards == 1:
        return 0
    data = channel.encode()
    best, best_score = 0, b""
    for index in range(shards):
        score = hashlib.blake2b(data, digest_size=8, salt=index.to_bytes(8, "big")).digest()
        if score > best_score:
            best, best_score = index, score
    return best
