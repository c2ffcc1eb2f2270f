"The job panel rendered in a real JupyterLab, in headless Chromium (Debian's package), following a real job on a real server, with a screenshot of each tab kept as a test artifact"
import json, os, secrets, shutil, socket, subprocess, sys, time
from pathlib import Path
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get('CEREBRIUM_FT_ARTIFACTS', ROOT/'test-artifacts'))
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')

pytestmark = pytest.mark.skipif(not CHROMIUM and os.environ.get('CI') != 'true',
                                reason="needs Debian's chromium (apt-get install chromium); tools/test.sh installs it where it can")

def notebook(url:str, key:str, jid:str) -> dict:
    "A notebook of one cell: the panel on the job service at `url`, following job `jid`"
    return {"cells": [{"cell_type": "code", "id": "panel", "metadata": {}, "execution_count": None, "outputs": [], "source": [
        "from cerebrium_ft.client import Client\n", "from cerebrium_ft.widget import JobPanel\n",
        f"panel = JobPanel(Client({url!r}, {key!r}), refresh_s=1)\n", f"panel.refresh(); panel.job.value = {jid!r}\n", "panel"]}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}

@pytest.fixture
def running_job(tmp_path, tiny_model):
    "A job service on loopback with a long job training on it, past its first validation"
    from test_service import Server, submit, wait_for
    from cerebrium_ft.testing import make_subject_images
    s = Server(tmp_path/'data', model_dir=tiny_model).start()
    s.key = next(w for w in s.output().split() if w.startswith('cft_'))
    make_subject_images(tmp_path/'robot', n=6, size=64)
    extra = dict(mixed_precision='no', validation_epochs=2, num_validation_images=2, validation_inference_steps=4, checkpointing_steps=1000)
    jid = json.loads(submit(s, tiny_model, tmp_path/'robot', steps=5000, extra=extra).stdout)['id']
    try:
        wait_for(s, jid, lambda j: j['step'] >= 8, timeout=300)  # validated at step 6
        yield s, jid
    finally: s.stop()

def _render(folder:Path, shots:dict, nb:dict):
    "Start JupyterLab on `folder`, open notebook `nb` in headless Chromium, run its cell, check each tab of the panel and screenshot it to `shots`"
    from playwright.sync_api import sync_playwright
    folder.mkdir(parents=True, exist_ok=True)
    (folder/'panel.ipynb').write_text(json.dumps(nb))
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    token = secrets.token_hex(8)
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(folder/'.cfg'), 'JUPYTERLAB_SETTINGS_DIR': str(folder/'.settings')}
    lab = subprocess.Popen([str(Path(sys.executable).parent/'jupyter'), 'lab', '--no-browser', f'--port={port}', '--ServerApp.ip=127.0.0.1',
                            f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={folder}', '--allow-root'],
                           stdout=open(folder/'.lab.log', 'w'), stderr=subprocess.STDOUT, env=env)
    page = None
    try:
        for _ in range(600):
            try:
                if requests.get(f"http://127.0.0.1:{port}/api/status", params={'token': token}, timeout=1).ok: break
            except requests.ConnectionError: time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                                        '--disable-background-networking', '--disable-component-update', '--disable-sync'])
            page = browser.new_page(viewport={'width': 1280, 'height': 1500})
            try:
                page.goto(f"http://127.0.0.1:{port}/lab/tree/panel.ipynb?token={token}")
                # the kernel's first start on a new machine compiles its imports: wait for the status bar's Idle, then run the
                # cell, and again if nothing rendered (a run sent while the kernel was still starting)
                page.wait_for_function("() => /Idle/.test(document.querySelector('#jp-main-statusbar')?.textContent || '')", timeout=180_000)
                for attempt in range(3):
                    page.click('.jp-Cell .jp-InputArea-editor')
                    page.keyboard.press('Shift+Enter')
                    try:
                        page.wait_for_selector('.jp-OutputArea button:has-text("Start job")', timeout=60_000); break
                    except Exception:
                        if attempt == 2: raise
                assert page.locator('.jp-OutputArea input[placeholder="sks-dog"]').count() == 1
                assert page.locator('.jp-OutputArea :text("Training settings")').count() >= 1
                assert page.locator('.jp-OutputArea :text("Advanced settings")').count() >= 1
                assert page.locator('.jp-OutputArea input[type="number"]').count() >= 10  # number boxes for the numbers
                no = page.get_by_role('button', name='No', exact=True)  # JupyterLab's "news?" toast, not part of the panel
                if no.count(): no.first.click()
                time.sleep(0.5)
                page.locator('.jp-OutputArea-output').first.screenshot(path=str(shots['new job']))  # the panel alone
                page.locator('.jp-OutputArea .lm-TabBar-tab:has-text("Jobs")').click()
                page.wait_for_selector('.jp-OutputArea button:has-text("Push to Hub")', timeout=30_000)
                page.wait_for_selector('.jp-OutputArea svg polyline', timeout=60_000)      # the live loss chart
                page.wait_for_selector('.jp-OutputArea :text("epoch 2")', timeout=60_000)  # a validation image, labelled
                assert page.locator('.jp-OutputArea b:text("running")').count() == 1
                time.sleep(0.5)
                page.locator('.jp-OutputArea-output').first.screenshot(path=str(shots['jobs']))
            except Exception:
                page.screenshot(path=str(folder/'failed.png'))
                raise
            finally: browser.close()
    finally:
        lab.terminate(); lab.wait(timeout=30)

def test_panel_renders_in_jupyterlab(tmp_path, running_job):
    assert CHROMIUM, "chromium is missing: apt-get install chromium"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server, jid = running_job
    shots, errors = {'new job': ARTIFACTS/'jobpanel-new-job.png', 'jobs': ARTIFACTS/'jobpanel-jobs.png'}, []
    for attempt in range(2):  # a cold JupyterLab on a busy 2-core machine gets a second chance; both failures are reported
        try: _render(tmp_path/f"try{attempt}", shots, notebook(server.url, server.key, jid)); break
        except Exception as e:
            log = (tmp_path/f"try{attempt}"/'.lab.log')
            errors.append(f"attempt {attempt + 1}: {type(e).__name__}: {str(e)[:500]}\n--- jupyter lab log ---\n{log.read_text()[-3000:] if log.exists() else ''}")
    else:
        for attempt in range(2):
            if (tmp_path/f"try{attempt}"/'failed.png').exists(): shutil.copy(tmp_path/f"try{attempt}"/'failed.png', ARTIFACTS/f"jobpanel-failed-{attempt + 1}.png")
        pytest.fail('\n\n'.join(errors))
    assert all(s.stat().st_size > 20_000 for s in shots.values())
