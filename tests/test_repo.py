"The repository's own contract: library generated from the notebooks, notebooks clean, README from index.ipynb, CI wired to the README"
import filecmp, json, re, shutil, subprocess, sys
from pathlib import Path
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

def _copy(tmp):
    for p in ['pyproject.toml', 'README.md']: shutil.copy(ROOT/p, tmp/p)
    shutil.copytree(ROOT/'nbs', tmp/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
    shutil.copytree(ROOT/'cerebrium_ft', tmp/'cerebrium_ft', ignore=shutil.ignore_patterns('__pycache__'))
    return tmp

def _same_tree(a, b, pattern):
    fa, fb = sorted(p.relative_to(a) for p in a.rglob(pattern)), sorted(p.relative_to(b) for p in b.rglob(pattern))
    assert fa == fb
    return [str(f) for f in fa if not filecmp.cmp(a/f, b/f, shallow=False)]

def test_library_is_exported_from_notebooks(tmp_path):
    t = _copy(tmp_path)
    subprocess.run([BIN/'nbdev-export'], cwd=t, check=True, capture_output=True)
    assert _same_tree(ROOT/'cerebrium_ft', t/'cerebrium_ft', '*.py') == [], "run nbdev-export: cerebrium_ft/ differs from the notebooks"

def test_notebooks_are_clean(tmp_path):
    t = _copy(tmp_path)
    subprocess.run([BIN/'nbdev-clean'], cwd=t, check=True, capture_output=True)
    assert _same_tree(ROOT/'nbs', t/'nbs', '*.ipynb') == [], "run nbdev-clean"

def test_readme_is_generated_from_index():
    r = subprocess.run([sys.executable, ROOT/'tools'/'make_readme.py', '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_the_readmes_pictures_are_in_the_repository():
    readme = (ROOT/'README.md').read_text()
    pictures = re.findall(r'!\[[^\]]*\]\(([^)\s]+)\)', readme)
    assert len(pictures) >= 3, pictures  # the panel, a loss plot, a validation grid
    tracked = set(subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines())
    assert [p for p in pictures if p not in tracked] == [], "commit them: python tools/readme_pictures.py writes them to nbs/images/"

def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT/'README.md').read_text()
    first_block = readme.split('```bash\n', 1)[1].split('```', 1)[0].splitlines()
    commands = [l.split('#')[0].strip() for l in first_block]
    assert commands == ['bash tools/demo.sh', 'bash tools/test.sh']
    assert readme.index('```bash') < readme.index('##'), "the commands come before the first section"
    ci = [l for l in (ROOT/'.ci'/'run').read_text().splitlines() if l.strip() and not l.startswith(('#', 'set ', 'cd '))]
    assert ci == ['bash tools/test.sh']

def test_quarto_config_is_valid_yaml():
    q = yaml.safe_load((ROOT/'nbs'/'_quarto.yml').read_text())
    assert q['project']['type'] == 'website'
    assert yaml.safe_load((ROOT/'nbs'/'nbdev.yml').read_text())['website']['title'] == 'cerebrium-ft'

def test_the_readme_is_a_front_door_and_the_guides_are_in_the_sidebar():
    "The README stays short (under 1,500 words of prose), every guide it links to is in the repository, and the sidebar lists every notebook once: the guides first, in a reader's order"
    import re
    readme = (ROOT/'README.md').read_text()
    assert len(re.sub(r'```.*?```', '', readme, flags=re.S).split()) < 1500
    links = re.findall(r'\]\((nbs/[^)#]+)\)', readme)
    assert links and all((ROOT/l).exists() for l in links), [l for l in links if not (ROOT/l).exists()]
    listed = re.findall(r'- (?:section: \w.*|(\S+\.ipynb))', (ROOT/'nbs'/'sidebar.yml').read_text())
    listed = [l for l in listed if l]
    notebooks = sorted(str(p.relative_to(ROOT/'nbs')) for p in (ROOT/'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
    assert sorted(listed) == notebooks and len(set(listed)) == len(listed)
    titles = [json.loads((ROOT/'nbs'/l).read_text())['cells'][0]['source'][0].strip('# \n') for l in listed if l.startswith('guides/')]
    assert titles == ['Get started', 'Datasets and captions', 'Training settings', 'Model families', 'The job service', 'Scaling out', 'In a notebook',
                      'Results and sharing', 'Reliability', 'Speed']
    assert 'custom_sidebar = true' in (ROOT/'pyproject.toml').read_text()  # nbdev-docs keeps it

def test_every_link_between_the_docs_pages_resolves():
    "A relative link in any notebook's text (a guide, a picture, another page) names a file that is there, from that notebook's folder, as the docs site and GitHub read it"
    bad = []
    for nb in sorted((ROOT/'nbs').rglob('*.ipynb')):
        if '.ipynb_checkpoints' in nb.parts: continue
        for c in json.loads(nb.read_text())['cells']:
            if c['cell_type'] != 'markdown': continue
            links = [t for t in re.findall(r'\]\(([^)\s]+)\)', ''.join(c['source'])) if not re.match(r'(https?:|mailto:|#)', t)]
            bad += [f"{nb.relative_to(ROOT)}: {t}" for t in links if not (nb.parent/t.split('#')[0]).exists()]
    assert not bad, bad

def test_the_settings_page_shows_the_table_the_code_gives():
    "The Training settings page's table is the kept output of settings_table(): a setting added, renamed or given another default fails here until python tools/keep_outputs.py nbs/guides/03_settings.ipynb is run"
    from cerebrium_ft.config import settings_table
    cells = json.loads((ROOT/'nbs'/'guides'/'03_settings.ipynb').read_text())['cells']
    shown = [''.join(o['data']['text/markdown']) for c in cells if 'Markdown(settings_table())' in ''.join(c['source']) for o in c['outputs'] if 'text/markdown' in o.get('data', {})]
    assert shown == [settings_table()], "run python tools/keep_outputs.py nbs/guides/03_settings.ipynb"

def test_setup_takes_torch_from_the_index_it_is_given(tmp_path):
    "tools/setup.sh installs torch first, from TORCH_INDEX_URL when it is set (a fake .venv python records what pip is asked)"
    (tmp_path/'tools').mkdir(); shutil.copy(ROOT/'tools'/'setup.sh', tmp_path/'tools'/'setup.sh')
    fake = tmp_path/'.venv'/'bin'/'python'; fake.parent.mkdir(parents=True)
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path/'calls'}\n"); fake.chmod(0o755)
    env = {'PATH': '/usr/bin:/bin', 'TORCH_INDEX_URL': 'https://download.pytorch.org/whl/cpu'}
    subprocess.run(['bash', tmp_path/'tools'/'setup.sh'], check=True, env=env)
    calls = (tmp_path/'calls').read_text().splitlines()
    assert calls[0].endswith('torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu') and calls[1].endswith('-e .[dev]'), calls
    (tmp_path/'calls').unlink()
    subprocess.run(['bash', tmp_path/'tools'/'setup.sh'], check=True, env={'PATH': '/usr/bin:/bin'})
    assert (tmp_path/'calls').read_text().splitlines()[0].endswith('--disable-pip-version-check torch==2.13.0')

def test_the_commands_the_service_page_says_take_json_do():
    import json, re
    from fastcore.script import anno_parser
    from cerebrium_ft.cli import COMMANDS
    page = ''.join(''.join(c['source']) for c in json.loads((ROOT/'nbs'/'guides'/'05_service.ipynb').read_text())['cells'])  # The job service's page
    sentence = page.split('Every command that reports something takes `--json`', 1)[1].split('.\n', 1)[0]
    named = re.findall(r'`([a-z-]+)`', sentence)
    assert set(COMMANDS) - set(named) == {'demo', 'run-job', 'train-rank'}, sentence  # all but the demo (a walk-through) and what the job service and torchrun start
    for name in named: assert '--json' in anno_parser(COMMANDS[name])._option_string_actions, name

LAYERS = {  # what each module may import from the package at its top: only what stands on its left (README, Developing)
    'config': set(), 'families': {'config'}, 'results': {'families', 'speed'}, 'speed': set(), 'store': {'config'}, 'testing': set(), 'executor': {'config', 'results', 'speed', 'store'},
    'dataset': {'config', 'results'}, 'prior': {'dataset', 'families', 'results', 'speed'}, 'train': {'config', 'dataset', 'families', 'prior', 'results', 'speed'},
    'server': {'config', 'dataset', 'executor', 'families', 'results', 'store'}, 'client': {'config', 'dataset', 'results'}, 'ray_jobs': {'executor', 'results'},
    'cli': {'config', 'dataset', 'families', 'results', 'client'}, 'hub': {'families', 'results'}, 'widget': {'config', 'dataset', 'families', 'results', 'client'}}

def test_layers_import_only_what_is_on_their_left():
    "Each module, or package (families: its modules together, their imports of each other inside it), imports from the package only what stands on its left"
    import ast
    pkg = ROOT/'cerebrium_ft'
    mods = {f.stem: [f] for f in pkg.glob('*.py') if not f.name.startswith('_')} | {d.name: sorted(d.glob('*.py')) for d in pkg.iterdir() if (d/'__init__.py').exists()}
    assert set(mods) == set(LAYERS), "a new module needs its place in LAYERS"
    for name, files in mods.items():
        inside = len(files) > 1 or files[0].name == '__init__.py'  # a package's modules: level 1 is the package itself, level 2 the library
        top = {n.module.split('.')[0] for f in files for n in ast.parse(f.read_text()).body
               if isinstance(n, ast.ImportFrom) and n.module and n.level == (2 if inside else 1)}
        assert top <= LAYERS[name], f"{name} imports {sorted(top - LAYERS[name])}, which stand to its right"
        if name in ('results', 'hub', 'server', 'executor', 'client', 'widget'): assert 'train' not in top, name

def _notebook(*cells) -> str:
    import json
    cell = lambda i, src: dict(cell_type='code', id=f"c{i}", metadata={}, execution_count=None, outputs=[], source=src)
    return json.dumps(dict(cells=[dict(cell_type='markdown', id='title', metadata={}, source='# Docs\n\n> a module')] + [cell(i, s) for i, s in enumerate(cells)],
                           metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')), nbformat=4, nbformat_minor=5))

def test_the_docs_stage_fails_on_a_notebook_whose_docs_break(tmp_path):
    "tools/docs_stage.py (in the test command) runs the cells show_doc needs: a show_doc of a type defined later fails it, in order it passes"
    shutil.copy(ROOT/'pyproject.toml', tmp_path); (tmp_path/'nbs').mkdir()
    for f in ['_quarto.yml', 'nbdev.yml']: shutil.copy(ROOT/'nbs'/f, tmp_path/'nbs'/f)
    uses, type_ = "#| export\nfrom __future__ import annotations\ndef make() -> Made: return Made()", "#| export\nclass Made: pass"
    run = lambda: subprocess.run([sys.executable, ROOT/'tools'/'docs_stage.py', tmp_path/'nbs'], capture_output=True, text=True)
    (tmp_path/'nbs'/'00_docs.ipynb').write_text(_notebook('#| default_exp docs', uses, type_))
    r = run()
    assert r.returncode == 1 and "NameError: name 'Made' is not defined" in r.stderr, r.stderr[-2000:]
    (tmp_path/'nbs'/'00_docs.ipynb').write_text(_notebook('#| default_exp docs', type_, uses))
    r = run()
    assert r.returncode == 0 and 'docs stage: 1 notebooks processed' in r.stdout, r.stderr[-2000:]

def test_notebooks_keep_the_outputs_a_reader_sees():
    "The dataset report, a loss plot and validation grid, a --help: kept in the notebooks (tools/keep_outputs.py), none of them megabytes"
    import json
    sys.path.insert(0, str(ROOT/'tools'))
    from keep_outputs import MAX_NOTEBOOK_BYTES, READER_OUTPUTS
    for nb in sorted((ROOT/'nbs').rglob('*.ipynb')): assert nb.stat().st_size < MAX_NOTEBOOK_BYTES, f"{nb.name} is {nb.stat().st_size // 1000} KB"
    for name, needles in READER_OUTPUTS.items():
        outs = [json.dumps(o) for c in json.loads((ROOT/'nbs'/name).read_text())['cells'] for o in c.get('outputs', [])]
        for n in set(needles):
            assert sum(n in o for o in outs) >= needles.count(n), f"{name} lost its output {n!r}: run python tools/keep_outputs.py nbs/{name}"
