"""The one exception a hostile stream may raise."""

from __future__ import annotations

from ..errors import VmsnapError


class StreamError(VmsnapError, ValueError):
    """Malformed, truncated or unsupported migration stream.

    ``field`` names what was being parsed, ``offset`` is the absolute stream offset of
    that field (``None`` if unknown), ``expected`` describes what was expected.
    """

    def __init__(
        self,
        message: str,
        field: str | None = None,
        offset: int | None = None,
        expected: str | None = None,
    ) -> None:
        self.message = message
        self.field = field
        self.offset = offset
        self.expected = expected
        parts = [message]
        if field is not None:
            parts.append(f"field={field}")
        if offset is not None:
            parts.append(f"offset={offset} (0x{offset:x})")
        if expected is not None:
            parts.append(f"expected {expected}")
        super().__init__("; ".join(parts))
