"The notebook job panel driven as a user drives it (values set, buttons clicked) against a real server on loopback"
import json, re, time, zipfile
import pytest
from cerebrium_ft.client import Client
from cerebrium_ft.results import choose_checkpoint
from cerebrium_ft.testing import FakeHub, make_subject_images
from cerebrium_ft.widget import JobPanel
from test_service import Server

@pytest.fixture
def server(tmp_path, tiny_model):
    s = Server(tmp_path/'data', model_dir=tiny_model).start()
    s.key = next(w for w in s.output().split() if w.startswith('cft_'))
    yield s
    s.stop()

def until(cond, timeout=180, every=0.2):
    end = time.time() + timeout
    while time.time() < end:
        if cond(): return True
        time.sleep(every)
    raise AssertionError('timed out')

def test_panel_starts_follows_and_shares_a_job(server, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_subject_images(tmp_path/'robot', n=6, size=64)
    panel = JobPanel(Client(server.url, server.key), refresh_s=0.3)
    try:
        panel.name.value, panel.model.value, panel.prompt.value = 'robot', str(tiny_model), 'a photo of sks robot'
        for k, v in dict(resolution='64', max_train_steps='10', num_validation_images=2, validation_epochs=1).items(): panel.settings[k].value = v
        panel.dataset.value = str(tmp_path/'robot')
        assert 'data:image/jpeg;base64,' in panel.dataset_report.value
        panel.start_btn.click()
        assert 'started job' in panel.message.value, panel.message.value
        jid = panel.job.value
        until(lambda: jid in panel.jobs.value)                        # the table refreshes by itself
        until(lambda: '<b>succeeded</b>' in panel.status.value)       # and so does the followed job
        until(lambda: len(panel.images.children) >= 2)                # with its validation images
        assert 'epoch 1 · step ' in panel.images.children[0].children[1].value and 'a photo of sks robot' in panel.images.children[0].children[1].value  # each labelled
        until(lambda: "fill='#555'>step 10<" in panel.chart.value)  # the loss chart, to the last step
        assert panel.chart.value.count('<circle') >= 1                # with the checkpoint scores
        assert (panel.progress.value, panel.progress.max) == (10, 10)
        assert 'done: 10 steps' in panel.log.value
        assert 'best checkpoint: ' in panel.status.value              # the checkpoint that scored best, named
        assert panel.cancel_btn.disabled and not panel.download_btn.disabled and not panel.push_btn.disabled  # a finished job: nothing to cancel
        panel.download_btn.click()
        assert (tmp_path/f"{jid}.zip").exists() and 'downloaded' in panel.message.value
        hub = FakeHub().start()
        monkeypatch.setenv('HF_ENDPOINT', hub.url); monkeypatch.setenv('HF_TOKEN', 'hf_test')
        panel.repo.value = 'me/robot'
        panel.push_btn.click()
        assert 'pushed to me/robot' in panel.message.value, panel.message.value
        assert 'pytorch_lora_weights.safetensors' in hub.files() and hub.created[-1]['visibility'] == 'private'  # private unless asked
        monkeypatch.delenv('HF_TOKEN'); monkeypatch.setenv('HF_HOME', str(tmp_path/'no-login'))
        panel.token.value, panel.public.value, panel.repo.value = 'hf_typed', True, 'me/robot-public'
        panel.push_btn.click()
        assert 'pushed to me/robot-public' in panel.message.value and hub.created[-1]['visibility'] == 'public', panel.message.value  # the token typed in the panel; public as ticked
        panel.repo.value = 'me/robot'
        panel.use.value = 'best'
        panel.push_btn.click()
        with zipfile.ZipFile(tmp_path/f"{jid}.zip") as z: want = z.read(choose_checkpoint(json.loads(z.read('manifest.json')), 'best')['weights'])
        assert hub.files()['pytorch_lora_weights.safetensors'] == want  # the best checkpoint's LoRA went up
        panel.repo.value = 'someone-else/robot'
        panel.push_btn.click()
        assert 'belongs to someone else' in panel.message.value      # an error shows in the panel, not as a traceback
        hub.stop()
    finally: panel.close()

def test_panel_cancels_a_running_job(server, tiny_model, tmp_path):
    make_subject_images(tmp_path/'robot', n=6, size=64)
    panel = JobPanel(Client(server.url, server.key), refresh_s=0.3)
    try:
        panel.name.value, panel.model.value, panel.prompt.value, panel.dataset.value = 'long', str(tiny_model), 'a photo of sks robot', str(tmp_path/'robot')
        panel.settings['resolution'].value, panel.settings['max_train_steps'].value = '64', '5000'
        panel.start_btn.click()
        until(lambda: re.search(r'<b>running</b> training \d+/5000, (loss \d\.\d{4}|waiting for the first loss)', panel.status.value))  # step, loss, then time left
        assert not panel.cancel_btn.disabled and panel.download_btn.disabled and panel.push_btn.disabled  # no results yet
        panel.cancel_btn.click()
        assert '<b>cancelled</b>' in panel.status.value and 'cancelled' in panel.message.value and panel.cancel_btn.disabled
    finally: panel.close()
