"""Decoding of the JSON columns the read path selects as text. orjson when installed
(much faster), the standard library otherwise and for what orjson refuses (integers beyond
64 bits, which jsonb's numeric can hold)."""

from __future__ import annotations

import json
from typing import Any

_decode_fallback = json.JSONDecoder().decode

try:
    import orjson

    def loads(text: str) -> Any:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return _decode_fallback(text)

except ImportError:  # pragma: no cover - orjson is a declared dependency

    def loads(text: str) -> Any:
        return _decode_fallback(text)
