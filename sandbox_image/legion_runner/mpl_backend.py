"""matplotlib's backend inside a sandbox: Agg, with ``show()`` sending each
open figure to the controller as a PNG artifact (then closing it).

Selected by the runner through ``MPLBACKEND=module://legion_runner.mpl_backend``;
imported by matplotlib only when sandbox code uses pyplot.
"""

from __future__ import annotations

from typing import Any

from matplotlib import _pylab_helpers
from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

from . import artifacts


def show(*args: Any, **kwargs: Any) -> None:
    for manager in _pylab_helpers.Gcf.get_all_fig_managers():
        artifacts.add_figure(manager.canvas.figure)
    _pylab_helpers.Gcf.destroy_all()


class FigureManager(FigureManagerBase):
    def show(self) -> None:  # figure.show()
        artifacts.add_figure(self.canvas.figure)

    @classmethod
    def pyplot_show(cls, *, block: bool | None = None) -> None:
        show()


class FigureCanvas(FigureCanvasAgg):
    manager_class = FigureManager
