"""Decoding of the JSON pgstate reads: orjson when installed (much faster), the standard
library otherwise and wherever orjson would lose a value. jsonb's numbers are numerics of
any size, and orjson turns an integer beyond 64 bits into a float, so a text with a run of
19 or more digits (2**63 has 19) goes to the standard library, which keeps it exact."""

from __future__ import annotations

import json
from typing import Any

# Every digit becomes "0", so a run of 19 digits is a run of 19 zeros: two C-speed passes,
# where a regular expression costs more than the parse it guards.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_DIGITS = b"0" * 19

try:
    import orjson

    def loads(data: str | bytes) -> Any:
        """Decode JSON text (or its UTF-8 bytes, as psycopg hands a JSON loader)."""
        utf8 = data.encode() if isinstance(data, str) else data
        if _NINETEEN_DIGITS not in utf8.translate(_DIGITS_TO_ZERO):
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError:
                pass  # numbers beyond a double's range, which jsonb holds: stdlib reads them
        return json.loads(data)

    def loads_each(texts: list[str]) -> list[Any]:
        """Decode a page of JSON texts. One scan of the whole page for a 19-digit run
        (joined by newlines, so no run spans two texts) costs a fraction of one scan per
        text; only a page that has one decodes text by text."""
        if _NINETEEN_DIGITS in "\n".join(texts).encode().translate(_DIGITS_TO_ZERO):
            return [loads(text) for text in texts]
        try:
            return list(map(orjson.loads, texts))
        except orjson.JSONDecodeError:
            return [loads(text) for text in texts]

except ImportError:  # pragma: no cover - orjson is a declared dependency

    def loads(data: str | bytes) -> Any:
        return json.loads(data)

    def loads_each(texts: list[str]) -> list[Any]:
        return [json.loads(text) for text in texts]
