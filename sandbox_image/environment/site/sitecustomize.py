"""Interpreter start-up in a Legion environment image (``site`` imports this
module at every start of Python in the sandbox).

The root filesystem is read-only at run time. matplotlib wants a writable
config and cache directory: when ``MPLCONFIGDIR`` is not writable it makes a
temporary one, warns, and rebuilds its font list there on first use. The
image built that font list at build time, in ``MPLCONFIGDIR``. Once
matplotlib is imported, its ``get_configdir`` and ``get_cachedir`` answer
that directory as it is: the font list is read from there, nothing is
written. (``MATPLOTLIBRC`` names the settings file, so importing matplotlib
itself never asks for the directory before this is in place.)
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType


class _BuiltMatplotlibCache(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "matplotlib":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        directory = os.environ.get("MPLCONFIGDIR", "")
        if spec is None or spec.loader is None or not os.path.isdir(directory):
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            module.get_configdir = lambda: directory  # type: ignore[attr-defined]
            module.get_cachedir = lambda: directory  # type: ignore[attr-defined]

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _BuiltMatplotlibCache())
