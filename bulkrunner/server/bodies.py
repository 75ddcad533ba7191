"""A submission's JSON body, read so that a big bulk's items never all exist as objects.

``json.loads`` of a 100,000-item body builds every item's dict at once: about 22 MB held
for a 1.4 MB body, and one C call that keeps every other thread of the server waiting for
the interpreter. Here a big body's ``items`` array is checked once and kept as its text;
:class:`ItemsText` decodes one item at a time, so each is checked, encoded and dropped
before the next is made. The result is the same as ``json.loads``: the same values, the
last of two fields of one name, the same errors for text that is not JSON.
"""

from __future__ import annotations

import json
import json.scanner
import re
from array import array
from collections.abc import Callable, Collection, Iterator
from typing import Any

#: Bodies shorter than this are read whole by ``json.loads`` (most submissions: one item
#: or a few hundred, where the objects cost little).
STREAM_BODY = 256 * 1024

_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, as the json module defines it
_WS_CHARS = " \t\n\r"
_DECODER = json.JSONDecoder()
_decode = _DECODER.raw_decode
#: What ``raw_decode`` calls, without its frame: an item decoded from where it begins.
_scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    _DECODER)  # type: ignore[arg-type]  # typeshed names the wrong class for the context


def _skip(text: str, i: int) -> int:
    """Where the whitespace at ``i`` ends."""
    m = _WS.match(text, i)
    return m.end() if m else i


def parse_json_body(data: bytes) -> Any:
    """The body as ``json.loads`` reads it, with a big object's ``items`` array (when it
    is one) as an :class:`ItemsText`. Raises ValueError (json.JSONDecodeError) or
    RecursionError as ``json.loads`` does."""
    if len(data) < STREAM_BODY:
        return json.loads(data)
    text = data.decode(json.detect_encoding(data), "surrogatepass")
    i = _skip(text, 0)
    if text[i:i + 1] != "{":
        return json.loads(text)
    body: dict[str, Any] = {}
    i = _skip(text, i + 1)
    if text[i:i + 1] == "}":
        i += 1
    else:
        while True:
            if text[i:i + 1] != '"':
                raise json.JSONDecodeError(
                    "Expecting property name enclosed in double quotes", text, i)
            key, i = _decode(text, i)
            i = _skip(text, i)
            if text[i:i + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
            i = _skip(text, i + 1)
            value: Any
            if key == "items" and text[i:i + 1] == "[":
                value, i = _items(text, i)
            else:
                value, i = _decode(text, i)
            body[key] = value
            i = _skip(text, i)
            if text[i:i + 1] == ",":
                i = _skip(text, i + 1)
                continue
            if text[i:i + 1] == "}":
                i += 1
                break
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
    end = _skip(text, i)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return body


def _items(text: str, start: int) -> tuple[ItemsText, int]:
    """The array at ``start`` (its ``[``), each element decoded once to check it, then
    dropped, and where each begins; and where the array ends."""
    scan = _scan
    i = _skip(text, start + 1)
    starts = array("q")
    if text[i:i + 1] == "]":
        return ItemsText(text, starts), i + 1
    while True:
        starts.append(i)
        try:
            _, i = scan(text, i)
        except StopIteration as e:  # what raw_decode makes of it
            raise json.JSONDecodeError("Expecting value", text, e.value) from None
        c = text[i:i + 1]
        if c and c in _WS_CHARS:
            i = _skip(text, i)
            c = text[i:i + 1]
        if c == ",":
            i += 1
            if text[i:i + 1] in _WS_CHARS:  # json.dumps writes ", " (and "" is in too)
                i = _skip(text, i)
        elif c == "]":
            return ItemsText(text, starts), i + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)


class ItemsText(Collection[Any]):
    """The items of a body, kept as the body's text and decoded one at a time as they are
    iterated (every pass decodes them again; the text was checked when this was made)."""

    def __init__(self, text: str, starts: array[int]) -> None:
        self._text, self._starts = text, starts

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[Any]:
        text, scan = self._text, _scan
        for i in self._starts:
            yield scan(text, i)[0]

    def __contains__(self, value: object) -> bool:
        return any(v == value for v in self)
