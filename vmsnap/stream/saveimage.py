"""Sans-IO codec of libvirt's QEMU save image (`virsh save`, managed save), version 2.

Layout (libvirt src/qemu/qemu_saveimage.h): a 92-byte host-endian header — magic[16],
u32 version, data_len, was_running, compressed (0 = raw), cookieOffset, u32 unused[14] —
then `data_len` bytes: the domain XML and a NUL, an optional cookie and a NUL, zero padding;
QEMU's migration stream follows at 92 + data_len. libvirt writes the header with the
"partial" magic first and rewrites it with the final one when QEMU is done (in place for a
file, after the stream when the image goes through a FIFO).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from .errors import StreamError

MAGIC = b"LibvirtQemudSave"
MAGIC_PARTIAL = b"LibvirtQemudPart"
VERSION = 2
HEADER = struct.Struct("<16s5I56x")
HEADER_SIZE = HEADER.size  # 92
#: libvirt leaves this much zero padding after XML and cookie, so the XML can be edited in place.
XML_PADDING = 64 << 10
#: Refuse a header that claims more XML than any domain has (libvirt itself caps it at 10 MiB).
MAX_DATA_LEN = 16 << 20
COMPRESSED_RAW = 0


class SaveImageError(StreamError):
    """Not a libvirt save image, or one vmsnap cannot use."""


@dataclass(frozen=True)
class SaveImageHeader:
    complete: bool
    data_len: int
    was_running: bool
    compressed: int = COMPRESSED_RAW
    cookie_offset: int = 0
    version: int = VERSION

    @property
    def stream_offset(self) -> int:
        """Where QEMU's migration stream starts."""
        return HEADER_SIZE + self.data_len

    def encode(self) -> bytes:
        return HEADER.pack(MAGIC if self.complete else MAGIC_PARTIAL, self.version,
                           self.data_len, int(self.was_running), self.compressed,
                           self.cookie_offset)

    def completed(self) -> SaveImageHeader:
        return replace(self, complete=True)


def parse_header(data: bytes) -> SaveImageHeader:
    """Parse and validate the 92-byte header (either byte order, as libvirt accepts)."""
    if len(data) < HEADER_SIZE:
        raise SaveImageError("not a libvirt save image: shorter than its 92-byte header",
                             "libvirt header", 0)
    magic = data[:16]
    if magic not in (MAGIC, MAGIC_PARTIAL):
        raise SaveImageError("not a libvirt save image (bad magic)", "libvirt magic", 0,
                             MAGIC.decode())
    fields = HEADER.unpack_from(data)
    swapped = struct.unpack_from(">16s5I", data)
    if fields[1] > VERSION and swapped[1] <= VERSION:  # written by a big-endian host
        fields = swapped
    _, version, data_len, running, compressed, cookie = fields
    if version not in (1, VERSION):
        raise SaveImageError(f"libvirt save image version {version} is not supported",
                             "libvirt version", 16, "1 or 2")
    if compressed != COMPRESSED_RAW:
        raise SaveImageError(f"libvirt save image is compressed (format {compressed}): save it "
                             "with save_image_format = \"raw\"", "libvirt compressed", 28, "0")
    if not 0 < data_len <= MAX_DATA_LEN:
        raise SaveImageError(f"libvirt save image claims {data_len} bytes of XML",
                             "libvirt data_len", 20, f"1..{MAX_DATA_LEN}")
    if cookie >= data_len:
        raise SaveImageError("libvirt save image cookie offset is past its data",
                             "libvirt cookieOffset", 32, f"< {data_len}")
    return SaveImageHeader(magic == MAGIC, data_len, bool(running), compressed, cookie, version)


def parse_data(header: SaveImageHeader, data: bytes) -> tuple[str, str | None]:
    """The domain XML and the cookie (None if absent) from the `data_len` bytes after the
    header."""
    if len(data) != header.data_len:
        raise SaveImageError("libvirt save image ends inside its domain XML", "libvirt xml",
                             HEADER_SIZE, f"{header.data_len} bytes")
    xml_part = data[:header.cookie_offset] if header.cookie_offset else data
    xml = _cstring(xml_part, "domain XML")
    if not xml.strip():
        raise SaveImageError("libvirt save image holds no domain XML", "libvirt xml",
                             HEADER_SIZE)
    cookie = None
    if header.cookie_offset:
        cookie = _cstring(data[header.cookie_offset:], "cookie") or None
    return xml, cookie


def _cstring(data: bytes, what: str) -> str:
    end = data.find(b"\x00")
    if end < 0:
        raise SaveImageError(f"libvirt save image {what} is not NUL-terminated",
                             f"libvirt {what}", HEADER_SIZE)
    try:
        return data[:end].decode()
    except UnicodeDecodeError as err:
        raise SaveImageError(f"libvirt save image {what} is not UTF-8", f"libvirt {what}",
                             HEADER_SIZE) from err


def encode_head(xml: str, *, was_running: bool, cookie: str | None = None,
                complete: bool = True) -> bytes:
    """Header, XML, cookie and padding: everything before QEMU's stream, as libvirt
    writes it (so `virsh save-image-edit` can grow the XML in place)."""
    if "\x00" in xml or "\x00" in (cookie or ""):
        raise SaveImageError("domain XML or cookie holds a NUL byte")
    body = xml.encode() + b"\x00"
    cookie_offset = 0
    if cookie:
        cookie_offset = len(body)
        body += cookie.encode() + b"\x00"
    data_len = len(body) + XML_PADDING
    if data_len > MAX_DATA_LEN:
        raise SaveImageError("domain XML too large for a libvirt save image")
    header = SaveImageHeader(complete, data_len, was_running, COMPRESSED_RAW, cookie_offset)
    return header.encode() + body + bytes(XML_PADDING)
