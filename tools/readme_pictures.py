"""Refresh the pictures the README opens with, in nbs/images/, from what a user of the demo and the panel sees:

    bash tools/demo.sh && .venv/bin/python -m pytest tests/test_jupyterlab.py && .venv/bin/python tools/readme_pictures.py

- jobpanel-jobs.png, jobpanel-new-job.png: the JupyterLab test's screenshots of the panel's two tabs (test-artifacts/), following a
  real job on a real server;
- loss.png, progress.png: the demo's results (demo-output/j_*.zip): its loss plot and its validation progress grid.

Each is written as a palette PNG (a few hundred KB at most in all), so the repository stays small."""
import sys, zipfile
from io import BytesIO
from pathlib import Path
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT/'nbs'/'images'

def save(im:Image.Image, name:str, width:int|None=None):
    "Write `im` to nbs/images/`name` as a palette PNG, `width` pixels wide at most (a small one, such as the tiny model's grids, twice its size)"
    if width and im.width > width: im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    elif im.width * 2 <= (width or 0): im = im.resize((im.width * 2, im.height * 2), Image.NEAREST)
    im = im.convert('RGB').quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    OUT.mkdir(parents=True, exist_ok=True)
    im.save(OUT/name, optimize=True)
    print(f"{OUT/name}: {im.width}x{im.height}, {(OUT/name).stat().st_size // 1024} KB")

def main():
    shots = ROOT/'test-artifacts'
    for name in ['jobpanel-jobs.png', 'jobpanel-new-job.png']:
        if not (shots/name).exists(): sys.exit(f"{shots/name} is missing: run .venv/bin/python -m pytest tests/test_jupyterlab.py first")
        with Image.open(shots/name) as im: save(im, name, 760)
    zips = sorted((ROOT/'demo-output').glob('j_*.zip'), key=lambda p: p.stat().st_mtime)
    if not zips: sys.exit("no demo results in demo-output/: run bash tools/demo.sh first")
    with zipfile.ZipFile(zips[-1]) as z:
        for member, name in [('loss.png', 'loss.png'), ('validation/progress.png', 'progress.png')]:
            save(Image.open(BytesIO(z.read(member))), name, 700)

if __name__ == '__main__': main()
