"""vmsnap: save a running QEMU VM to a fixed-offset (mapped-ram) file and restore it, fast."""

from .api import open, restore, save  # noqa: A004
from .errors import VmsnapError

__all__ = ["open", "restore", "save", "VmsnapError"]
__version__ = "0.1.0"
