"""Package attributes that load on first use (PEP 562 `__getattr__`): importing a package
(vmsnap, vmsnap.stream, vmsnap.fileformat) does not import every module it re-exports, so
that a restore can read a file's metadata and start QEMU before numpy loads."""

from __future__ import annotations

import importlib
from typing import Any


def load_export(package: str, exports: dict[str, str], namespace: dict[str, Any],
                name: str) -> object:
    """The attribute `name` of `package`, from the module `exports` names for it (relative
    to the package), kept in the package's `namespace` from then on."""
    module = exports.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, package), name)
    namespace[name] = value
    return value
