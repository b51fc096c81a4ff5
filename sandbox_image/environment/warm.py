"""Run at image build time, as root: write the caches that the packages of
this environment would otherwise write on first import, when the root
filesystem is read-only. Today: matplotlib's font list."""

import importlib.util

if importlib.util.find_spec("matplotlib") is not None:
    import matplotlib.font_manager  # noqa: F401 - builds the font list in MPLCONFIGDIR

    print("legion environment: matplotlib's font list is built")
