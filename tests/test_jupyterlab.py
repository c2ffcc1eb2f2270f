"The job panel rendered in a real JupyterLab, in headless Chromium (Debian's package), with a screenshot kept as a test artifact"
import json, os, secrets, shutil, socket, subprocess, sys, time
from pathlib import Path
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get('CEREBRIUM_FT_ARTIFACTS', ROOT/'test-artifacts'))
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')

pytestmark = pytest.mark.skipif(not CHROMIUM and os.environ.get('CI') != 'true',
                                reason="needs Debian's chromium (apt-get install chromium); tools/test.sh installs it where it can")

NOTEBOOK = {"cells": [{"cell_type": "code", "id": "panel", "metadata": {}, "execution_count": None, "outputs": [], "source": [
    "from cerebrium_ft.client import Client\n", "from cerebrium_ft.widget import JobPanel\n",
    "panel = JobPanel(Client('http://127.0.0.1:9', 'cft_demo_key', retries=0), autorefresh=False)\n", "panel"]}],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}

def test_panel_renders_in_jupyterlab(tmp_path):
    assert CHROMIUM, "chromium is missing: apt-get install chromium"
    from playwright.sync_api import sync_playwright
    (tmp_path/'panel.ipynb').write_text(json.dumps(NOTEBOOK))
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    token = secrets.token_hex(8)
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(tmp_path/'cfg'), 'JUPYTERLAB_SETTINGS_DIR': str(tmp_path/'settings')}
    lab = subprocess.Popen([str(Path(sys.executable).parent/'jupyter'), 'lab', '--no-browser', f'--port={port}', '--ServerApp.ip=127.0.0.1',
                            f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={tmp_path}', '--allow-root'],
                           stdout=open(tmp_path/'lab.log', 'w'), stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(300):
            try:
                if requests.get(f"http://127.0.0.1:{port}/api/status", params={'token': token}, timeout=1).ok: break
            except requests.ConnectionError: time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                                        '--disable-background-networking', '--disable-component-update', '--disable-sync'])
            page = browser.new_page(viewport={'width': 1280, 'height': 1000})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/panel.ipynb?token={token}")
            page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=90_000)
            page.click('.jp-Cell .jp-InputArea-editor')
            page.keyboard.press('Shift+Enter')
            page.wait_for_selector('.jp-OutputArea button:has-text("Start job")', timeout=90_000)
            assert page.locator('.jp-OutputArea input[placeholder="sks-dog"]').count() == 1
            assert page.locator('.jp-OutputArea :text("Training settings")').count() >= 1
            page.locator('.jp-OutputArea .lm-TabBar-tab:has-text("Jobs")').click()
            page.wait_for_selector('.jp-OutputArea button:has-text("Push to Hub")', timeout=30_000)
            page.locator('.jp-OutputArea .lm-TabBar-tab:has-text("New job")').click()
            no = page.get_by_role('button', name='No', exact=True)  # JupyterLab's "news?" toast, not part of the panel
            if no.count(): no.first.click()
            time.sleep(0.5)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS/'jobpanel-jupyterlab.png'
            page.screenshot(path=str(shot))
            browser.close()
        assert shot.stat().st_size > 20_000
    finally:
        lab.terminate(); lab.wait(timeout=30)
