"""A multipart upload read as it arrives: the file part goes straight to a temporary file and
reading stops at the size limit, before the rest of the body is received."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

from .formats import ApiError

MAX_FIELDS = 100
MAX_FIELD_BYTES = 64 * 1024


class ClientGone(Exception):
    """The client closed the connection before the whole body arrived."""


@dataclass
class Upload:
    fields: dict[str, list[str]] = field(default_factory=dict)
    path: str | None = None  # the temporary file holding the `file` part
    filename: str = ""
    size: int = 0

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"Maximum content size limit ({limit}) exceeded.",
        code="request_too_large",
    )


async def read_upload(
    headers: dict[str, str],
    chunks: AsyncIterator[bytes],
    upload_dir: str,
    limit: int,
    upload: Upload,
) -> None:
    """Fill `upload` from a multipart body; the caller removes `upload.path` in any case.

    Raises ApiError (400 malformed or truncated, 413 over `limit`) or ClientGone.
    """
    content_type = headers.get("content-type", "")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(400, "expected a multipart/form-data body with a 'file' part", param="file")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        # Refused before reading a byte of it.
        raise _too_large(limit)

    state: dict = {"headers": {}, "name": None, "file": None, "value": bytearray(), "end": False}
    header_field = bytearray()
    header_value = bytearray()
    received = 0

    def on_part_begin() -> None:
        state["headers"] = {}
        state["name"] = None
        state["file"] = None
        state["value"] = bytearray()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        state["headers"][bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        disposition, options = parse_options_header(
            state["headers"].get(b"content-disposition", b"")
        )
        if disposition != b"form-data" or b"name" not in options:
            raise ApiError(400, "malformed multipart part (no form-data name)")
        name = options[b"name"].decode("utf-8", "replace")
        state["name"] = name
        # The 'file' part is the upload with a file name or without one (clients leave an
        # empty name out: it was read as a form field, and refused as one far too long).
        if b"filename" in options or name == "file":
            if name != "file" or upload.path is not None:
                raise ApiError(400, "only one file, in the 'file' field, is accepted", param=name)
            upload.filename = options.get(b"filename", b"").decode("utf-8", "replace")
            fd, path = tempfile.mkstemp(prefix="upload-", dir=upload_dir)
            upload.path = path
            state["file"] = os.fdopen(fd, "wb")
        elif sum(len(v) for v in upload.fields.values()) >= MAX_FIELDS:
            raise ApiError(400, f"too many form fields (at most {MAX_FIELDS})")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["file"] is not None:
            # Local disk writes of a network chunk are short enough for the event loop.
            state["file"].write(data[start:end])
            upload.size += end - start
            return
        state["value"].extend(data[start:end])
        if len(state["value"]) > MAX_FIELD_BYTES:
            raise ApiError(400, f"form field '{state['name']}' is too long", param=state["name"])

    def on_part_end() -> None:
        if state["file"] is not None:
            state["file"].close()
            state["file"] = None
        elif state["name"] is not None:
            value = state["value"].decode("utf-8", "replace")
            upload.fields.setdefault(state["name"], []).append(value)

    def on_end() -> None:
        state["end"] = True

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_end": on_end,
        },
    )
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise _too_large(limit)
            try:
                parser.write(chunk)
            except ApiError:
                raise
            except Exception:  # python-multipart's parse errors
                raise ApiError(400, "malformed multipart body") from None
        try:
            parser.finalize()
        except Exception:
            raise ApiError(400, "malformed multipart body") from None
    finally:
        if state["file"] is not None:
            state["file"].close()
    if not state["end"]:
        raise ApiError(400, "the upload was truncated (the multipart body does not end)")
