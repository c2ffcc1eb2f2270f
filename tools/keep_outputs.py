"""Run notebooks and keep the outputs a reader should see in them: what cells print and display (tables, plots, image grids,
`--help` texts), not what goes to stderr (progress bars, warnings), and nothing from `#| hide` cells.

    python tools/keep_outputs.py nbs/01_dataset.ipynb nbs/04_train.ipynb nbs/10_cli.ipynb

Each kept cell's outputs are capped at MAX_CELL_BYTES; `tests/test_repo.py` checks that the outputs listed in READER_OUTPUTS
are there and that no notebook grows past MAX_NOTEBOOK_BYTES. Run it after changing a cell whose output a reader sees."""
import json, os, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_CELL_BYTES, MAX_NOTEBOOK_BYTES = 300_000, 1_000_000
READER_OUTPUTS = {  # notebook: what its outputs must show
    '01_dataset.ipynb': ["<img src='data:image/jpeg;base64,"],      # the dataset report, with thumbnails
    '04_train.ipynb': ['image/png', 'image/jpeg'],                   # the loss plot and a validation grid
    '10_cli.ipynb': ['usage: cerebrium-ft train-diffuser'],          # a command's --help
    'guides/03_settings.ipynb': ['| `learning_rate` |'],             # the settings table
    'tutorials/01_train_locally.ipynb': ["<img src='data:image/jpeg;base64,", 'steps; last loss'],  # the tutorials as they ran: the dataset report, the run
    'tutorials/02_remote_jobs.ipynb': ['succeeded 20 / 20'],
    'tutorials/03_use_results.ipynb': ["['default_0']"],
}

def _hidden(cell) -> bool: return any(l.replace(' ', '') == '#|hide' for l in cell.source.splitlines() if l.startswith('#|'))

def _smallest_image(o):
    "An output shown as both PNG and JPEG (a PIL image) kept in the smaller of the two"
    imgs = [k for k in o.get('data', {}) if k in ('image/png', 'image/jpeg')]
    for k in sorted(imgs, key=lambda k: len(o['data'][k]))[1:]: del o['data'][k]
    return o

def _reader_outputs(cell) -> list:
    outs = [_smallest_image(o) for o in cell.outputs if not (o.get('output_type') == 'stream' and o.get('name') == 'stderr')]
    return [] if _hidden(cell) or len(json.dumps(outs)) > MAX_CELL_BYTES else outs

def keep_outputs(nb_path:Path):
    "Execute `nb_path` as `nbdev-test` does (from its folder) and write it back with its reader-facing outputs"
    from fastcore.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    nb, here = read_nb(nb_path), os.getcwd()
    os.chdir(nb_path.parent)
    try:
        shell = CaptureShell()
        shell.run_all(nb, exc_stop=True)
    finally: os.chdir(here)
    for c in nb.cells:
        if c.cell_type != 'code': continue
        c.outputs = _reader_outputs(c); c.execution_count = None; c.metadata.pop('execution', None)
    write_nb(nb, nb_path)
    print(f"{nb_path.name}: {sum(bool(c.get('outputs')) for c in nb.cells)} cells with outputs, {nb_path.stat().st_size // 1000} KB")

if __name__ == '__main__':
    for p in sys.argv[1:] or [ROOT/'nbs'/n for n in READER_OUTPUTS]: keep_outputs(Path(p).resolve())
