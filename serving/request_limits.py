"""Limits at the door, applied before a body reaches pydantic, the tokenizer or the engine.

- ``read_body``: the body in chunks, refused with a 413 as soon as it passes ``max_bytes`` (a declared
  ``Content-Length`` over the limit is refused before reading at all), so a 20 MB body never sits in memory
  whole nor gets parsed.
- ``parse_json``: JSON with a nesting-depth limit and no unpaired surrogates: ``json.loads`` turns 1,000 nested
  objects into a RecursionError and a lone ``"\\ud800"`` into a str that the tokenizer later fails on with a
  TypeError; both are the client's 400 here, naming where in the body it happened.

``parse_json`` is CPU work proportional to the body: the router runs it in its worker pool, off the event loop.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only a type here: the engine, imported by training's rollouts, must not need starlette
    from starlette.requests import Request

from serving.errors import InvalidRequestError, RequestTooLargeError

# 2 MiB: a 32k-token prompt is ~130 KB of text or ~230 KB as token ids; 16x that leaves room for long chats
# while a 20 MB body (finding 1 of issue 18: 16 s of a frozen event loop) is refused after its first 2 MiB.
DEFAULT_MAX_BODY_BYTES = 2 << 20
# OpenAI's request bodies nest 5 deep (messages[i].content[j].text); tool schemas may nest further. 64 leaves
# room and stays far below the ~1,000 at which json.loads recurses out.
DEFAULT_MAX_JSON_DEPTH = 64


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"request body is larger than the server's limit of {limit} bytes")


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _path(parts: list[Any]) -> str:
    return ".".join(str(p) for p in parts)


def check_json(doc: Any, max_depth: int) -> None:
    """Depth and unpaired surrogates, walked without recursion; errors name the path (``messages.0.content``)."""
    stack: list[tuple[Any, list[Any]]] = [(doc, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(f"{_path(path) or 'body'}: string contains an unpaired surrogate "
                                          "(\\ud800-\\udfff); send valid UTF-16 pairs or UTF-8",
                                          param=_path(path) or None) from None
            continue
        if not isinstance(value, (dict, list)):
            continue
        if len(path) >= max_depth:
            raise InvalidRequestError(f"request body nests deeper than {max_depth} levels at {_path(path)}",
                                      param=_path(path[:1]) or None)
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str):
                    stack.append((k, [*path, k]))
                stack.append((v, [*path, k]))
        else:
            stack.extend((v, [*path, i]) for i, v in enumerate(value))


def parse_json(raw: bytes, max_depth: int) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"request body is not valid UTF-8: {e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequestError(f"request body nests deeper than {max_depth} levels") from None
    check_json(doc, max_depth)
    return doc
