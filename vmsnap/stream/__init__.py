"""Sans-IO codec of QEMU's migration stream (main stream and multifd packets).

The names below load on first use (see vmsnap.exports): `vmsnap.stream.constants` loads
without the codec (and numpy)."""

from typing import TYPE_CHECKING

from ..exports import load_export

_EVENTS = ("Command", "Configuration", "DeviceState", "Event", "Header", "MappedRamHeader",
           "MultifdFlush", "Pages", "Prelude", "RamBlock", "RamBlocks", "RamEnd", "RamEos",
           "SectionEnd", "SectionPart", "SectionStart", "StreamEnd", "ZeroPages")
#: public name -> the module that defines it
_EXPORTS = {**dict.fromkeys(_EVENTS, ".events"), "StreamDecoder": ".decoder",
            "StreamError": ".errors", "encode_events": ".reencode"}

if TYPE_CHECKING:
    from . import encoder
    from .decoder import StreamDecoder
    from .errors import StreamError
    from .events import (
        Command,
        Configuration,
        DeviceState,
        Event,
        Header,
        MappedRamHeader,
        MultifdFlush,
        Pages,
        Prelude,
        RamBlock,
        RamBlocks,
        RamEnd,
        RamEos,
        SectionEnd,
        SectionPart,
        SectionStart,
        StreamEnd,
        ZeroPages,
    )
    from .reencode import encode_events


def __getattr__(name: str) -> object:
    return load_export(__name__, _EXPORTS, globals(), name)


__all__ = [
    "Command", "Configuration", "DeviceState", "Event", "Header", "MappedRamHeader",
    "MultifdFlush", "Pages", "Prelude", "RamBlock", "RamBlocks", "RamEnd", "RamEos",
    "SectionEnd", "SectionPart", "SectionStart", "StreamDecoder", "StreamEnd",
    "StreamError", "ZeroPages", "encode_events", "encoder",
]
