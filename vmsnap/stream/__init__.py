"""Sans-IO codec of QEMU's migration stream (main stream and multifd packets)."""

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

__all__ = [
    "Command", "Configuration", "DeviceState", "Event", "Header", "MappedRamHeader",
    "MultifdFlush", "Pages", "Prelude", "RamBlock", "RamBlocks", "RamEnd", "RamEos",
    "SectionEnd", "SectionPart", "SectionStart", "StreamDecoder", "StreamEnd",
    "StreamError", "ZeroPages", "encode_events", "encoder",
]
