"""numpy, loaded at its first use instead of at import.

numpy's import costs ~45 ms of CPU on every command that loads a module using it. A restore
that lets QEMU read the file itself (`--no-verify`) needs none of it before QEMU starts
loading: what vmsnap does before that is all QEMU's load waits for. Modules take `np` from
here (`import numpy as np` for the type checker) and numpy loads when first called
(importlib's LazyLoader: the module object is numpy's own, filled in at the first attribute
access).
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = ["np"]


def _deferred(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:
    import numpy as np
else:
    np = _deferred("numpy")
