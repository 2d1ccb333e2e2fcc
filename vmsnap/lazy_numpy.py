"""numpy, imported at its first use instead of at import.

numpy's import costs ~50 ms of CPU. Opening a snapshot needs none of it until pages or
checksum tables are handled as arrays, and a restore that lets QEMU read the file itself
(`--no-verify`) never does: what vmsnap does before `migrate-incoming` is all QEMU's load
waits for. So the modules on the way to an open file (io.vectored, io.aligned,
stream.events, .decoder, fileformat.bitmap, .trailer, .reader) take `np` from here (`import
numpy as np` for the type checker): it imports numpy at the first attribute asked of it.
Modules whose work is arrays import numpy as usual, so it loads with them, as before (a
save's or a lazy restore's machinery, before it acts on the VM).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["np"]


class _Numpy:
    """Stands for the numpy module: each name asked of it is numpy's, looked up once."""

    def __getattr__(self, name: str) -> Any:
        import numpy

        value = getattr(numpy, name)
        setattr(self, name, value)  # found without __getattr__ from now on
        return value


if TYPE_CHECKING:
    import numpy as np
else:
    np = _Numpy()
