"""Write README.md from nbs/index.ipynb, the way nbdev would without Quarto: markdown cells as they are,
code cells as Python blocks (`#|` directive lines dropped, `#| hide` cells skipped), outputs kept if present; a picture's or
a guide's path relative to nbs/ (`images/...`, `guides/...`, where the docs site finds them) made relative to the repository's root.
`--check` exits 1 when README.md differs from what the notebook gives."""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->"

def _code(cell):
    lines = ''.join(cell['source']).splitlines()
    if any(l.strip().replace(' ', '') in ('#|hide', '#|exec_doc:false') for l in lines if l.startswith('#|')): return None
    src = '\n'.join(l for l in lines if not l.startswith('#|')).strip('\n')
    parts = [f"```python\n{src}\n```"] if src else []
    for o in cell.get('outputs', []):
        text = ''.join(o.get('text', '') or o.get('data', {}).get('text/plain', ''))
        if text.strip(): parts.append(f"```\n{text.rstrip()}\n```")
    return '\n\n'.join(parts) or None

def render(nb_path=ROOT/'nbs'/'index.ipynb') -> str:
    "README text for notebook `nb_path`"
    cells = json.loads(Path(nb_path).read_text())['cells']
    blocks = [''.join(c['source']).strip('\n').replace('](images/', '](nbs/images/').replace('](guides/', '](nbs/guides/') if c['cell_type'] == 'markdown' else _code(c) for c in cells]
    return '\n\n'.join(b for b in blocks if b) + '\n\n' + HEADER + '\n'

if __name__ == '__main__':
    text, readme = render(), ROOT/'README.md'
    if '--check' in sys.argv[1:]:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md is not what nbs/index.ipynb gives: run `python tools/make_readme.py` and commit the result")
    else: readme.write_text(text)
