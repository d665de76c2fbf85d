"""Run notebooks and store their outputs (the site shows the stored outputs; `nbdev-test` runs but does not store).

    python docs_site/run_notebooks.py nbs/tutorials/01_pretraining.ipynb [...]

Each notebook runs in its own folder, as `nbdev-test` runs it; cells marked `#| eval: false` are not run. Run
`nbdev-clean` afterwards. Written here because nbdev 3 has no command that executes a notebook in place.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from fastcore.nbio import read_nb, write_nb
from execnb.shell import CaptureShell


def _skip_no_eval(cell):
    "nbdev's `#| eval: false`: shown on the page, never run."
    if cell.cell_type == 'code' and any(l.strip().replace(' ', '') == '#|eval:false' for l in cell.source.splitlines()):
        cell.source = ''  # execnb skips empty cells; the source is restored below


def run(path: Path):
    nb = read_nb(path)
    keep = [c.source for c in nb.cells]
    for c in nb.cells: _skip_no_eval(c)
    here = Path.cwd()
    os.chdir(path.parent)
    try:
        CaptureShell().run_all(nb, exc_stop=True)
    finally:
        os.chdir(here)
    for c, src in zip(nb.cells, keep):
        c.source = src
    write_nb(nb, path)


if __name__ == '__main__':
    for p in sys.argv[1:]:
        print('running', p, flush=True)
        run(Path(p).resolve())
