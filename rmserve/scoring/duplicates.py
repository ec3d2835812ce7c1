"""The exact-duplicate cache: an input scored before is answered from memory, without a forward.

GRPO samples G responses per prompt, and identical responses are common (short answers, a policy that
has collapsed); best-of-n and re-scoring runs send the same inputs again. Per model, a bounded
least-recently-used map keeps each scored input's outputs under a 16-byte BLAKE2b digest of what decides
them: its token ids (every member's, for an ensemble), its token type ids, and the lambdas its
aggregates were computed with. The digest, not the ids, is kept, so an entry costs a few hundred bytes
whatever the input's length. A model's weights never change while it is served, so entries never go
stale.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Generic, TypeVar

from rmserve.aggregation import AggregationParams
from rmserve.models.base import Encoded
from rmserve.models.ensemble import MemberInputs
from rmserve.models.inputs import EncodedInput

V = TypeVar("V")


def _parts(encoded: Encoded) -> Sequence[EncodedInput] | None:
    if isinstance(encoded, EncodedInput):
        return (encoded,)
    if isinstance(encoded, MemberInputs):
        return encoded.parts
    return None


def input_digest(encoded: Encoded, params: AggregationParams) -> bytes | None:
    """The key of one encoded input scored with ``params`` (None: an input kind the cache cannot key)."""
    parts = _parts(encoded)
    if parts is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(struct.pack("<dd", params.uwo_lambda, params.tradeoff_lambda))
    for part in parts:
        types = part.token_type_ids or ()
        digest.update(struct.pack("<qq", len(part.token_ids), len(types)))
        digest.update(array("q", part.token_ids).tobytes())
        digest.update(array("q", types).tobytes())
    return digest.digest()


class DuplicateCache(Generic[V]):
    """At most ``entries`` outputs by key, the least recently used dropped first.

    Raises:
        ValueError: ``entries`` is below 1 (no cache at all is the caller's None).
    """

    def __init__(self, entries: int) -> None:
        if entries < 1:
            raise ValueError("a duplicate cache holds at least one entry; use no cache to turn it off.")
        self.entries = entries
        self._store: OrderedDict[bytes, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: bytes) -> V | None:
        """The outputs stored under ``key``, now the most recently used; None if absent."""
        value = self._store.get(key)
        if value is not None:
            self._store.move_to_end(key)
        return value

    def put(self, key: bytes, value: V) -> None:
        """Store ``value`` under ``key``, dropping the least recently used entry past ``entries``."""
        self._store[key] = value
        self._store.move_to_end(key)
        while len(self._store) > self.entries:
            self._store.popitem(last=False)
