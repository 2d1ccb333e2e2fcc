"""Constants of QEMU's migration stream (reference §1, §2, §3)."""

import struct

#: the stream's big-endian integers
BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")

QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 3
QEMU_VM_FILE_VERSION_COMPAT = 2

# top-level record types (§1.4)
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

# commands (§1.7)
MIG_CMD_OPEN_RETURN_PATH = 1
MIG_CMD_PING = 2
MIG_CMD_POSTCOPY_ADVISE = 3
MIG_CMD_POSTCOPY_LISTEN = 4
MIG_CMD_POSTCOPY_RUN = 5
MIG_CMD_POSTCOPY_RAM_DISCARD = 6
MIG_CMD_PACKAGED = 7
MIG_CMD_ENABLE_COLO = 8
MIG_CMD_POSTCOPY_RESUME = 9
MIG_CMD_RECV_BITMAP = 10
MIG_CMD_SWITCHOVER_START = 11
MIG_CMD_MAX = 12

COMMAND_NAMES = {
    1: "OPEN_RETURN_PATH",
    2: "PING",
    3: "POSTCOPY_ADVISE",
    4: "POSTCOPY_LISTEN",
    5: "POSTCOPY_RUN",
    6: "POSTCOPY_RAM_DISCARD",
    7: "PACKAGED",
    8: "ENABLE_COLO",
    9: "POSTCOPY_RESUME",
    10: "RECV_BITMAP",
    11: "SWITCHOVER_START",
}
# fixed payload lengths; a tuple means "one of"; None means variable
COMMAND_LENGTHS: dict[int, tuple[int, ...] | None] = {
    1: (0,),
    2: (4,),
    3: (16, 0),
    4: (0,),
    5: (0,),
    6: None,
    7: (4,),
    8: (0,),
    9: (0,),
    10: None,
    11: (0,),
}

# RAM record flags (§2.1)
RAM_SAVE_FLAG_FULL = 0x01
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200

RAM_IDSTR = b"ram"
RAM_INSTANCE_ID = 0
RAM_VERSION_ID = 4

#: Target page size of every architecture vmsnap saves (x86-64, aarch64 with 4 KiB pages).
TARGET_PAGE_SIZE = 4096
#: QEMU's (and vmsnap's) placement of a mapped-ram page area: on a 1 MiB boundary.
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 1 << 20

CAPS_SUBSECTION = "configuration/capabilities"
#: Capability of a fixed-offset file: a bitmap and a page area per RAM block.
CAP_MAPPED_RAM = "mapped-ram"
#: Capability that leaves shared RAM out of the stream and adds `addr` to each RAM block entry.
CAP_IGNORE_SHARED = "x-ignore-shared"
PAGE_BITS_SUBSECTION = "configuration/target-page-bits"
UUID_SUBSECTION = "configuration/uuid"

MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_HDR_SIZE = 28

MAX_VMDESC_LEN = 64 * 1024 * 1024
MAX_MACHINE_NAME = 256
MAX_CAPABILITIES = 256
MAX_RAM_BLOCKS = 4096

# multifd (§3)
MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_PACKET_SIZE = 512 * 1024
MULTIFD_INIT_SIZE = 64
MULTIFD_HDR_FIXED = 320
MULTIFD_FLAG_SYNC = 0x1
MULTIFD_FLAG_COMPRESSION_MASK = 0x3E
MULTIFD_FLAG_DEVICE_STATE = 0x40

# postcopy (§1.7, §4.3)
POSTCOPY_RAM_DISCARD_VERSION = 0
#: PING value a source puts in the PACKAGED blob (QEMU's own sources send 3)
PACKAGED_PING = 3

# return-path messages, destination -> source on the main socket (§4.1)
MIG_RP_MSG_SHUT = 1
MIG_RP_MSG_PONG = 2
MIG_RP_MSG_REQ_PAGES_ID = 3
MIG_RP_MSG_REQ_PAGES = 4
MIG_RP_MSG_RECV_BITMAP = 5
MIG_RP_MSG_RESUME_ACK = 6
MIG_RP_MSG_SWITCHOVER_ACK = 7
#: QEMU's source refuses longer return-path messages (migration.c, source_return_path_thread)
RP_MAX_LEN = 512
#: what ends the raw bitmap after a RECV_BITMAP reply (ram.c, RAMBLOCK_RECV_BITMAP_ENDING)
RECV_BITMAP_ENDING = 0x0123456789ABCDEF
#: RESUME_ACK's value (migration.h, MIGRATION_RESUME_ACK_VALUE)
RESUME_ACK_VALUE = 1
RP_FIXED_LENGTHS = {MIG_RP_MSG_SHUT: 4, MIG_RP_MSG_PONG: 4, MIG_RP_MSG_REQ_PAGES: 12,
                    MIG_RP_MSG_RESUME_ACK: 4, MIG_RP_MSG_SWITCHOVER_ACK: 0}
