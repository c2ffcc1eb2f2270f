"""The docs build's first stage, without Quarto: nbdev processes every notebook into `_proc/` as `nbdev-docs`
would before rendering, running the cells the API docs need (exported cells, cells of imports, `show_doc`).
A notebook whose docs would break (a `show_doc` of a name not yet defined, an import cell that needs test state)
fails here with nbdev's message. (`nbdev-proc-nbs` does the same, but first offers to install Quarto with sudo.)"""
import sys
from pathlib import Path
from nbdev.serve import proc_nbs

ROOT = Path(__file__).resolve().parent.parent

if __name__ == '__main__':
    nbs = Path(sys.argv[1]).resolve() if sys.argv[1:] else ROOT/'nbs'  # another project's notebooks (its pyproject.toml above them)
    try: cache = proc_nbs(str(nbs), n_workers=2, force=True)
    except Exception as e: sys.exit(f"docs stage failed: {e}")
    n = len(list(Path(cache).rglob('*.ipynb')))
    print(f"docs stage: {n} notebooks processed into {cache}")
