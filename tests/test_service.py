"The job service as a user runs it: a real server process on loopback, real SQLite, the tiny model, the CLI as subprocesses"
import csv, io, json, os, signal, socket, subprocess, threading, time, zipfile
from pathlib import Path
import pytest
import requests
from diffusers import StableDiffusionPipeline
from cerebrium_ft.results import choose_checkpoint, load_results
from cerebrium_ft.testing import make_subject_images
from conftest import BIN, run_cli

def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

class Server:
    "`cerebrium-ft serve` in a process of its own"
    def __init__(self, data_dir, port=None, workers=1, model_dir=None, gpus=None, database_url=None, extra=(), env=None, cwd=None):
        self.data_dir, self.port, self.workers, self.model_dir, self.gpus = Path(data_dir), port or free_port(), workers, model_dir, gpus
        self.database_url, self.extra, self.env, self.cwd = database_url, list(map(str, extra)), env, cwd
        self.url = f"http://127.0.0.1:{self.port}"
    def start(self):
        self.log = open(self.data_dir.parent/f"serve-{self.port}-{time.time_ns()}.log", 'w')
        self.proc = subprocess.Popen([str(BIN/'cerebrium-ft'), 'serve', '--port', str(self.port), '--data-dir', str(self.data_dir),
                                      *(['--workers', str(self.workers)] if self.workers else []), *(['--gpus', self.gpus] if self.gpus else []),
                                      *(['--database-url', self.database_url] if self.database_url else []),
                                      *(['--model-dir', str(self.model_dir)] if self.model_dir else []), *self.extra], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=self.env, cwd=self.cwd)
        end = time.time() + 180  # a generous bound for a busy machine; a server that exits is reported at once
        while time.time() < end and self.proc.poll() is None:
            try:
                if requests.get(self.url + '/v1/health', timeout=5).ok: return self
            except requests.RequestException: time.sleep(0.1)
        raise RuntimeError(Path(self.log.name).read_text())
    def kill9(self): os.kill(self.proc.pid, signal.SIGKILL); self.proc.wait()
    def stop(self):
        if self.proc.poll() is None: self.proc.send_signal(signal.SIGINT); self.proc.wait(timeout=30)
    def output(self): return Path(self.log.name).read_text()

@pytest.fixture
def server(tmp_path, tiny_model):
    s = Server(tmp_path/'data', model_dir=tiny_model).start()
    out = s.output()
    s.key = next(w for w in out.split() if w.startswith('cft_'))
    s.project = next(w for w in out.replace('(', ' ').replace(')', ' ').split() if w.startswith('p_'))
    yield s
    s.stop()

@pytest.fixture
def data(tmp_path):
    make_subject_images(tmp_path/'robot', n=6, size=64)
    return tmp_path/'robot'

def submit(server, model, data, key=None, steps=20, follow=False, extra=None):
    ta = {**dict(resolution=64, max_train_steps=steps, num_validation_images=1, checkpointing_steps=10), **(extra or {})}
    r = run_cli('train-diffuser', 'robot', key or server.key, model, data, 'a photo of sks robot', '--url', server.url,
                '--training-args', json.dumps(ta), *(['--follow'] if follow else []), '--json')
    return r

def job(server, jid, key=None):
    return requests.get(f"{server.url}/v1/jobs/{jid}", headers={'Authorization': f"Bearer {key or server.key}"}).json()

def wait_for(server, jid, cond, timeout=180, most=3600):
    """Job `jid` once `cond` holds of it. A slow machine makes a slow test, not a failed one: it fails only when the job stayed as it was (its status,
    phase, step, attempts, error) for `timeout` seconds, or after `most` seconds in all"""
    start = last_change = time.time()
    seen = None
    while time.time() - last_change < timeout and time.time() - start < most:
        j = job(server, jid)
        if cond(j): return j
        now = tuple(j.get(k) for k in ('status', 'phase', 'step', 'attempts', 'error'))
        if now != seen: seen, last_change = now, time.time()
        time.sleep(0.1)
    raise AssertionError(f"timed out: the job stayed so for {timeout} s: {j}")

def test_cli_flow_from_train_diffuser_to_loading_the_weights(server, tiny_model, data, tmp_path):
    (data/'robot_00.txt').write_text('a photo of sks robot on a red sofa'); (data/'robot_01.txt').write_text('a photo of sks robot in the snow')
    r = submit(server, tiny_model, data, follow=True, extra=dict(validation_epochs=2))
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j['status'] == 'succeeded' and j['step'] == j['total'] == 20
    assert r.stderr.splitlines()[-1] == 'done 20/20' and '\r' not in r.stderr, r.stderr  # --follow's status, not a terminal: a line at each phase, no carriage returns
    assert j['best']['step'] in (6, 12, 18, 20) and j['best']['latest'] == 'final'  # the job names its best-scoring checkpoint
    r = run_cli('check-job-status', j['id'], server.key, '--include-logs', 'True', '--url', server.url)
    assert r.returncode == 0 and 'succeeded' in r.stdout and '--- log ---' in r.stdout and 'done: 20 steps' in r.stdout
    assert f"best      {j['best']['checkpoint']} (step {j['best']['step']}): score" in r.stdout
    flag = run_cli('check-job-status', j['id'], server.key, '--include-logs', '--url', server.url)  # the flag alone works too
    assert flag.returncode == 0 and '--- log ---' in flag.stdout and '--- log ---' not in run_cli('check-job-status', j['id'], server.key, '--include-logs', 'False', '--url', server.url).stdout
    assert 'captions: 2 of 6 images have their own' in r.stdout  # the .txt captions went up with their images and reached the trainer
    r = run_cli('get-most-recent-jobs', server.project, server.key, '--url', server.url)
    assert r.returncode == 0 and j['id'] in r.stdout and 'DURATION' in r.stdout
    out = tmp_path/'robot.zip'
    r = run_cli('download-model', j['id'], server.key, '--output', out, '--url', server.url)
    assert r.returncode == 0 and out.exists() and not list(tmp_path.glob('.*.partial'))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    m = load_results(pipe, out)
    assert m['steps'] == 20 and m['best']['checkpoint'] == j['best']['checkpoint']
    with zipfile.ZipFile(out) as z: rows, texts = list(csv.DictReader(io.StringIO(z.read('metrics.csv').decode()))), {n: z.read(n).decode() for n in ('manifest.json', 'logs.txt')}
    status = run_cli('check-job-status', j['id'], server.key, '--include-logs', '--url', server.url, '--json').stdout
    for where, text in [*texts.items(), ('the job and its log', status)]:  # no path of the server's reaches its tenant: the job's files relative to it, the model by name
        assert str(server.data_dir) not in text and str(Path(tiny_model).parent) not in text, (where, text)
    assert m['base_model']['path'] == m['job']['hf_model_path'] == Path(tiny_model).name and m['job']['dataset'] == 'dataset'
    scored = {int(r['step']): float(r['score']) for r in rows if r['score']}
    assert sorted(scored) == [6, 12, 18, 20] and j['best']['step'] == min(scored, key=scored.get), (scored, j['best'])  # the lowest held-out score, whichever it is
    r = run_cli('download-model', j['id'], server.key, '--use', 'best', '--url', server.url, '--json', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got['checkpoint'], got['step'], got['path']) == (j['best']['checkpoint'], j['best']['step'], f"{j['id']}-best.safetensors")
    with zipfile.ZipFile(out) as z: want = z.read(choose_checkpoint(m, 'best')['weights'])
    assert (tmp_path/f"{j['id']}-best.safetensors").read_bytes() == want  # that checkpoint's LoRA alone
    r = run_cli('download-model', j['id'], server.key, '--use', '7', '--output', tmp_path/'seven.safetensors', '--url', server.url)
    assert r.returncode != 0 and "keep no checkpoint '7'" in r.stderr and not list(tmp_path.glob('*seven*'))
    auth = {'Authorization': f"Bearer {server.key}"}
    r = requests.get(f"{server.url}/v1/jobs/{j['id']}/weights", params=dict(use='best'), headers=auth)  # what --use asks for: the one file, not the zip
    assert r.status_code == 200 and r.content == want and (r.headers['x-checkpoint'], int(r.headers['x-checkpoint-step'])) == (j['best']['checkpoint'], j['best']['step'])
    r = requests.get(f"{server.url}/v1/jobs/{j['id']}/weights", params=dict(use='7'), headers=auth)
    assert r.status_code == 400 and "keep no checkpoint '7'; use final, best or one of" in r.json()['detail']

LIGHT_INSTALL = """import sys
ABSENT = {'torch', 'diffusers', 'transformers', 'peft', 'accelerate', 'bitsandbytes', 'fastapi', 'uvicorn', 'sqlalchemy', 'starlette', 'multipart', 'python_multipart', 'psycopg'}
class _Absent:
    "A machine with the light install: the training stack and the job service's packages are not there"
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ABSENT: raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Absent())
"""

def test_the_light_install_submits_follows_and_downloads_jobs(server, tiny_model, data, tmp_path):
    "Without the training stack and the server's packages (pip install cerebrium-ft, no extras): the client, the CLI, the dataset check and the panel work, a job is submitted, followed and downloaded; train and serve say which extra they need"
    site = tmp_path/'light'; site.mkdir(); (site/'sitecustomize.py').write_text(LIGHT_INSTALL)
    env = {**os.environ, 'PYTHONPATH': str(site)}
    r = run_cli('check-dataset', data, env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli('train-diffuser', 'robot', server.key, tiny_model, data, 'a photo of sks robot', '--url', server.url, '--follow', '--json',
                '--training-args', json.dumps(dict(resolution=64, max_train_steps=4, num_validation_images=1)), env=env)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout); assert j['status'] == 'succeeded', j
    r = run_cli('download-model', j['id'], server.key, '--url', server.url, '--output', tmp_path/'robot.zip', env=env)
    assert r.returncode == 0 and zipfile.is_zipfile(tmp_path/'robot.zip'), r.stderr
    r = subprocess.run([str(BIN/'python'), '-c', 'from cerebrium_ft.widget import JobPanel; from cerebrium_ft.client import Client; JobPanel(Client("%s", "%s"))' % (server.url, server.key)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    for args, extra in [(['train', 'robot', tiny_model, data, 'a photo of sks robot', '--output', tmp_path/'run'], 'train'), (['serve', '--data-dir', tmp_path/'srv'], 'server'),
                        (['generate', tmp_path/'robot.zip', 'a robot'], 'train')]:
        r = run_cli(*args, env=env)
        assert r.returncode == 2 and f"which is not installed here: pip install 'cerebrium-ft[{extra}]' (or 'cerebrium-ft[all]' for everything)" in r.stderr, r.stderr
    assert not (tmp_path/'run').exists()

def test_keys_and_projects_are_isolated(server, tiny_model, data):
    r = submit(server, tiny_model, data, steps=2)
    jid = json.loads(r.stdout)['id']
    r = run_cli('check-job-status', jid, 'cft_wrong_key', '--url', server.url)
    assert r.returncode == 1 and '401' in r.stderr
    k2 = run_cli('keys', 'create', server.project, '--data-dir', server.data_dir, '--json')
    key2 = json.loads(k2.stdout)['api_key']
    assert run_cli('check-job-status', jid, key2, '--url', server.url).returncode == 0
    assert run_cli('keys', 'revoke', key2, '--data-dir', server.data_dir).returncode == 0
    r = run_cli('check-job-status', jid, key2, '--url', server.url)
    assert r.returncode == 1 and '401: invalid or revoked API key' in r.stderr
    b = json.loads(run_cli('projects', 'create', 'other team', '--data-dir', server.data_dir, '--json').stdout)
    for cmd in (['check-job-status', jid], ['download-model', jid], ['cancel-job', jid]):
        r = run_cli(*cmd, b['api_key'], '--url', server.url)
        assert r.returncode == 1 and f'404: no job {jid}' in r.stderr, (cmd, r.stderr)
    logs = requests.get(f"{server.url}/v1/jobs/{jid}/logs", headers={'Authorization': f"Bearer {b['api_key']}"})
    assert logs.status_code == 404
    r = run_cli('get-most-recent-jobs', b['project_id'], b['api_key'], '--url', server.url, '--json')
    assert json.loads(r.stdout)['jobs'] == []
    assert run_cli('get-most-recent-jobs', server.project, b['api_key'], '--url', server.url).returncode == 1

def test_bad_uploads_are_refused_and_nothing_is_stored(server, tiny_model, data, tmp_path):
    from PIL import Image
    import io
    photos = sorted(data.glob('*.jpg'))
    spec = json.dumps(dict(name='robot', hf_model_path=str(tiny_model), training_prompt='a photo of sks robot', training_args=dict(resolution=64)))
    def post(files, **kw):
        return requests.post(f"{server.url}/v1/jobs", data={'spec': spec}, files=[('images', f) for f in files],
                             headers={'Authorization': f"Bearer {server.key}"}, **kw)
    good = [(p.name, p.read_bytes()) for p in photos]
    bomb = io.BytesIO(); Image.new('1', (10_000, 10_000)).save(bomb, 'PNG')
    cases = {'truncated': (good[1:] + [('t.jpg', good[0][1][:2000])], 400), 'non-image': (good + [('x.jpg', b'hello')], 400),
             'bomb': (good + [('b.png', bomb.getvalue())], 413), 'too many files': (good * 11, 413),
             'oversized': ([('big.png', os.urandom(201 * 2**20))], 413)}
    for name, (files, status) in cases.items():
        r = post(files)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert r.json()['detail'], name
    assert not (server.data_dir/'jobs').exists() or not any((server.data_dir/'jobs').iterdir())
    assert not any((server.data_dir/'uploads').iterdir())
    r = run_cli('get-most-recent-jobs', server.project, server.key, '--url', server.url, '--json')
    assert json.loads(r.stdout)['jobs'] == []
    # the CLI checks the dataset before uploading anything
    (data/'broken.jpg').write_bytes(photos[0].read_bytes()[:1000])
    r = submit(server, tiny_model, data)
    assert r.returncode == 1 and 'nothing was uploaded' in r.stderr

def test_kill9_of_the_job_process_fails_the_job_with_the_reason(server, tiny_model, data):
    jid = json.loads(submit(server, tiny_model, data, steps=3000).stdout)['id']
    wait_for(server, jid, lambda j: j['phase'] == 'training' and j['step'] > 0)
    pid = int(subprocess.run(['pgrep', '-f', f'run-job .*{jid}'], capture_output=True, text=True).stdout.split()[0])
    os.kill(pid, signal.SIGKILL)
    j = wait_for(server, jid, lambda j: j['status'] != 'running', timeout=30)
    assert j['status'] == 'failed' and 'killed by SIGKILL' in j['error']

def test_kill9_of_the_server_then_restart_resumes_the_job(server, tiny_model, data):
    jid = json.loads(submit(server, tiny_model, data, steps=400, extra=dict(checkpointing_steps=20)).stdout)['id']
    wait_for(server, jid, lambda j: j['step'] >= 40)
    server.kill9()
    s2 = Server(server.data_dir, server.port, model_dir=server.model_dir).start()
    s2.key = server.key
    try:
        j = wait_for(s2, jid, lambda j: j['status'] in ('succeeded', 'failed', 'cancelled'), timeout=300)
        assert j['status'] == 'succeeded' and j['attempts'] == 2 and j['resumed_from'] >= 20, j  # the record says where it resumed
        log = requests.get(f"{s2.url}/v1/jobs/{jid}/logs", headers={'Authorization': f"Bearer {server.key}"}).json()['text']
        assert 'resuming from step_' in log and '--- attempt 2' in log
    finally: s2.stop()

ESCAPER = """import os, subprocess, sys
if os.environ.get('CEREBRIUM_FT_JOB') and 'run-job' in sys.argv:  # the job's process starts a grandchild that leaves its process group for a session of its own
    p = subprocess.Popen(['sleep', '600'], start_new_session=True)
    with open(os.path.join(os.environ['CEREBRIUM_FT_JOB'], 'escaped.pid'), 'w') as f: f.write(str(p.pid))
"""

def _alive(pid):
    "Whether process `pid` runs (a zombie waiting for its parent does not)"
    try: stat = Path(f'/proc/{pid}/stat').read_text()
    except OSError: return False
    return stat[stat.rindex(')') + 2] not in 'ZX'

def test_cancel_ends_every_process_of_the_job(tmp_path, tiny_model, data):
    "Cancel ends the job's whole tree before it answers: its process group, and a grandchild that left the group for a session of its own (found by the job's CEREBRIUM_FT_JOB variable)"
    site = tmp_path/'site'; site.mkdir(); (site/'sitecustomize.py').write_text(ESCAPER)
    server = Server(tmp_path/'data', model_dir=tiny_model, env={**os.environ, 'PYTHONPATH': str(site)}).start()
    server.key = next(w for w in server.output().split() if w.startswith('cft_'))
    try:
        jid = json.loads(submit(server, tiny_model, data, steps=3000).stdout)['id']
        wait_for(server, jid, lambda j: j['phase'] == 'training')
        pids = [int(p) for p in subprocess.run(['pgrep', '-f', f'run-job .*{jid}'], capture_output=True, text=True).stdout.split()]
        escaped = int((server.data_dir/'jobs'/jid/'escaped.pid').read_text())
        assert pids and _alive(escaped) and os.getpgid(escaped) not in {os.getpgid(p) for p in pids}  # outside the job's process group
        r = run_cli('cancel-job', jid, server.key, '--url', server.url, '--json')
        assert r.returncode == 0 and json.loads(r.stdout)['status'] == 'cancelled'
        assert [p for p in pids + [escaped] if _alive(p)] == []  # gone by the time cancel answered
        assert job(server, jid)['status'] == 'cancelled'
    finally: server.stop()

def test_twenty_clients_polling_while_a_job_trains(server, tiny_model, data):
    jid = json.loads(submit(server, tiny_model, data, steps=150).stdout)['id']
    errors, counts = [], []
    def poll():
        n, s = 0, requests.Session()
        end = time.time() + 8
        while time.time() < end:
            try:
                r = s.get(f"{server.url}/v1/jobs/{jid}", headers={'Authorization': f"Bearer {server.key}"}, timeout=10)
                if r.status_code != 200: errors.append(r.status_code)
                n += 1
            except Exception as e: errors.append(repr(e))
            time.sleep(0.02)
        counts.append(n)
    threads = [threading.Thread(target=poll) for _ in range(20)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert errors == [] and len(counts) == 20 and min(counts) > 5
    assert wait_for(server, jid, lambda j: j['status'] != 'running' and j['status'] != 'queued', timeout=180)['status'] == 'succeeded'

def test_login_saves_a_checked_key_readable_by_its_owner_only(server, tmp_path):
    env = {**os.environ, 'XDG_CONFIG_HOME': str(tmp_path/'cfg')}
    r = run_cli('login', 'cft_wrong_key', '--url', server.url, env=env)
    assert r.returncode == 1 and '401' in r.stderr and not (tmp_path/'cfg').exists()
    r = run_cli('login', server.key, '--url', server.url, env=env)
    f = tmp_path/'cfg'/'cerebrium-ft'/'login.json'
    assert r.returncode == 0 and server.project in r.stdout and oct(f.stat().st_mode & 0o777) == '0o600'
    j = json.loads(run_cli('login', server.key, '--url', server.url, '--json', env=env).stdout)
    assert j == dict(project_id=server.project, url=server.url, saved_to=str(f))
    r = run_cli('get-most-recent-jobs', server.project, env=env)  # key and URL from the login file
    assert r.returncode == 0 and 'no jobs' in r.stdout
    r = run_cli('get-most-recent-jobs', server.project, '--url', 'http://127.0.0.1:9', env=env)
    assert r.returncode == 1 and 'cannot reach the job service' in r.stderr

def test_readme_demo_runs_the_whole_product(tmp_path):
    "The README's main command, less its install step: service, train-diffuser --follow, status, download, load, grid"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, 'CEREBRIUM_FT_SKIP_SETUP': '1', 'CEREBRIUM_FT_DEMO_PORT': str(free_port())}
    r = subprocess.run(['bash', root/'tools'/'demo.sh', tmp_path/'demo'], capture_output=True, text=True, env=env, timeout=1800)  # generous: a busy machine
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert ': succeeded' in r.stdout and (tmp_path/'demo'/'samples.png').exists()
    assert len(list((tmp_path/'demo').glob('j_*.zip'))) == 1

def test_push_to_hub_from_a_job_id(server, tiny_model, data, tmp_path):
    from cerebrium_ft.testing import FakeHub
    r = submit(server, tiny_model, data, steps=4, follow=True)
    jid = json.loads(r.stdout)['id']
    hub = FakeHub().start()
    try:
        env = {**os.environ, **hub.env, 'HF_HOME': str(tmp_path/'hf')}
        r = run_cli('push-to-hub', jid, 'me/sks-robot', '--token', 'hf_test', '--api-key', server.key, '--url', server.url, '--json', env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)['commit_url'].startswith(f"{hub.url}/me/sks-robot/commit/")
        files = hub.files()
        assert {'README.md', 'pytorch_lora_weights.safetensors', 'lora_kohya.safetensors', 'manifest.json'} <= set(files)
        assert 'pytorch_lora_weights.safetensors' in hub.lfs_paths()
        assert sum(c.endswith('/commit/main') for c in hub.calls) == 1
        r = run_cli('push-to-hub', jid, 'me/sks-robot', '--token', 'hf_test', '--api-key', server.key, '--url', server.url, '--use', 'best', env=env)
        assert r.returncode == 0 and hub.files()['pytorch_lora_weights.safetensors'] == files['pytorch_lora_weights.safetensors']  # 4 steps: one scored checkpoint, the final
        r = run_cli('push-to-hub', jid, 'me/sks-robot', '--token', 'hf_test', '--api-key', server.key, '--url', server.url, '--use', '2', env=env)
        assert r.returncode == 2 and "keep no checkpoint '2'" in r.stderr
        r = run_cli('push-to-hub', jid, 'me/sks-robot', '--api-key', server.key, '--url', server.url, env={**env, 'HF_TOKEN': ''})
        assert r.returncode == 2 and 'no Hugging Face token: give one with --token' in r.stderr
        r = run_cli('push-to-hub', jid, 'me/sks-robot', '--token', 'hf_test', '--api-key', server.key, '--url', server.url, '--revision', 'rank-4',
                    '--commit-message', 'first try', '--base-model', 'stable-diffusion-v1-5/stable-diffusion-v1-5', env=env)
        assert r.returncode == 0, r.stderr
        assert hub.calls[-1] == '/api/models/me/sks-robot/commit/rank-4' and hub.commits[-1][0]['value']['summary'] == 'first try'
        assert 'base_model: stable-diffusion-v1-5/stable-diffusion-v1-5' in hub.files()['README.md'].decode()
        assert str(server.data_dir) not in hub.files()['manifest.json'].decode(), "the server's paths stay on the server"
        r = run_cli('push-to-hub', 'no/such/folder', 'me/x', '--token', 't', env=env)
        assert r.returncode == 2 and 'neither a results folder or zip nor a job id' in r.stderr
    finally: hub.stop()

def test_each_family_trains_through_the_service_and_loads_in_its_pipeline(tmp_path, data):
    "SD 2.x (v-prediction), SDXL, FLUX.1, SD 3.5, Z-Image, Qwen-Image, FLUX.2 [klein] and [dev] jobs run to success on the service and load in their own pipelines; a video model is refused at submission"
    from diffusers import Flux2KleinPipeline, Flux2Pipeline, FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, ZImagePipeline
    from cerebrium_ft.results import load_pipeline
    from cerebrium_ft.testing import build_tiny_pipeline
    models = tmp_path/'models'
    wan = models/'wan'; wan.mkdir(parents=True); (wan/'model_index.json').write_text('{"_class_name": "WanPipeline"}')
    s = Server(tmp_path/'data', model_dir=models).start()
    try:
        s.key = next(w for w in s.output().split() if w.startswith('cft_'))
        for family, pipeline in [('sd2-v', StableDiffusionPipeline), ('sdxl', StableDiffusionXLPipeline), ('flux', FluxPipeline), ('sd3', StableDiffusion3Pipeline),
                                 ('z-image', ZImagePipeline), ('qwen-image', QwenImagePipeline), ('flux2-klein', Flux2KleinPipeline),
                                 ('flux2', Flux2Pipeline)]:
            model = build_tiny_pipeline(models/family, family=family)
            layers = dict(lora_layers='transformer', loraplus_lr_ratio=4) if family == 'flux' else {}  # FLUX.1's also on its feed-forwards, with LoRA+
            r = submit(s, model, data, steps=6, follow=True, extra=dict(mixed_precision='no', **layers))
            assert r.returncode == 0, r.stderr
            j = json.loads(r.stdout); assert j['status'] == 'succeeded', j
            assert run_cli('download-model', j['id'], s.key, '--output', tmp_path/f"{family}.zip", '--url', s.url).returncode == 0
            assert type(load_pipeline(tmp_path/f"{family}.zip", model=model, device='cpu')) is pipeline  # the zip names the server's model folder by name alone
            lora = json.loads(zipfile.ZipFile(tmp_path/f"{family}.zip").read('manifest.json'))['lora']
            assert ('ff_context.net.2' in lora['targets']) == bool(layers), lora['targets']
        r = submit(s, wan, data, steps=6)
        assert r.returncode == 1 and 'is a WanPipeline (a video model), which cerebrium-ft does not train' in r.stderr, r.stderr
    finally: s.stop()

def test_serve_runs_each_job_on_a_gpu_of_its_own(tmp_path, tiny_model, data):
    "serve --gpus 1,0: one worker per GPU, two jobs at once, each holding its own GPU, named in its row and by check-job-status (the ids reach each job as CUDA_VISIBLE_DEVICES; on this CPU machine the jobs train on the CPU all the same)"
    s = Server(tmp_path/'data', model_dir=tiny_model, workers=None, gpus='1,0').start()
    try:
        key = s.key = next(w for w in s.output().split() if w.startswith('cft_'))
        assert "2 workers, each job on a GPU of its own: 1,0" in s.output()
        jids = [json.loads(submit(s, tiny_model, data, key=key, steps=12, extra=dict(mixed_precision='no')).stdout)['id'] for _ in range(2)]  # fp32: as fast on every CPU
        held = [wait_for(s, jid, lambda j: j['status'] == 'running' and j['gpus'], timeout=120)['gpus'] for jid in jids]
        assert sorted(held) == ['0', '1'], held  # both at once, on different GPUs
        for jid in jids: assert wait_for(s, jid, lambda j: j['status'] in ('succeeded', 'failed'), timeout=240)['status'] == 'succeeded'
        r = run_cli('check-job-status', jids[0], key, '--url', s.url)
        assert f"gpus      {held[0]} (when it ran)" in r.stdout, r.stdout
    finally: s.stop()
    for args, message in [(['--gpus', '0', '--workers', '2'], "--workers 2 with 1 GPU (0): each job holds a GPU of its own; give --workers 1 or fewer, or --gpus none"),
                          (['--gpus', '0,,1'], "--gpus 0,,1: give GPU ids separated by commas, each once")]:
        r = run_cli('serve', '--data-dir', tmp_path/'other', '--port', str(free_port()), *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr

def test_a_job_on_two_gpus_runs_data_parallel(tmp_path, tiny_model, data):
    "A job with gpus 2 on serve --gpus 1,0 holds both GPUs and trains as two processes (here on the CPU, through gloo), its log saying how the batch is split; a job wanting more GPUs than the server has is refused at submission, nothing stored"
    s = Server(tmp_path/'data', model_dir=tiny_model, workers=None, gpus='1,0').start()
    try:
        s.key = next(w for w in s.output().split() if w.startswith('cft_'))
        r = submit(s, tiny_model, data, steps=6, extra=dict(gpus=2, train_batch_size=1, mixed_precision='no'))
        jid = json.loads(r.stdout)['id']
        assert wait_for(s, jid, lambda j: j['status'] == 'running' and j['gpus'], timeout=120)['gpus'] == '1,0'
        assert wait_for(s, jid, lambda j: j['status'] in ('succeeded', 'failed'), timeout=300)['status'] == 'succeeded', job(s, jid)
        r = run_cli('check-job-status', jid, s.key, '--url', s.url, '--include-logs')
        assert 'data-parallel: 2 processes on cpu (gloo), started by torchrun' in r.stdout, r.stdout
        assert "(train_batch_size 1 per process x 2 processes)" in r.stdout
        before = run_cli('get-most-recent-jobs', s.key, '--url', s.url, '--json').stdout
        r = submit(s, tiny_model, data, steps=6, extra=dict(gpus=3))
        assert r.returncode == 1 and 'gpus 3: this server has 2 GPUs (1,0): set gpus 2 or fewer in --training-args' in r.stderr, r.stderr
        assert run_cli('get-most-recent-jobs', s.key, '--url', s.url, '--json').stdout == before
    finally: s.stop()

def test_a_job_asking_for_more_processes_than_a_cpu_server_has_is_refused(server, tiny_model, data):
    "On a server without GPUs a job's gpus are data-parallel CPU processes: more than the server's cores is refused at submission, with the limit, nothing stored"
    cores = len(os.sched_getaffinity(0))
    r = submit(server, tiny_model, data, steps=6, extra=dict(gpus=64))
    assert r.returncode == 1 and (f"gpus 64: this server runs jobs without GPUs, a data-parallel job's processes on its {cores} CPU core"
                                  f"{'s' * (cores != 1)}: set gpus {cores} or fewer in --training-args") in r.stderr, r.stderr
    assert json.loads(run_cli('get-most-recent-jobs', server.project, server.key, '--url', server.url, '--json').stdout)['jobs'] == []

@pytest.mark.parametrize('url,said', [('notaurl', "'notaurl' is not a database URL: give postgresql+psycopg://"),
                                      ('mysql://cft:pw@db/jobs', 'mysql is not a database cerebrium-ft keeps jobs in: it keeps them in SQLite (the default) or PostgreSQL')])
def test_a_database_url_that_is_not_one_is_refused_before_anything_is_made(tmp_path, url, said):
    "--database-url (or CEREBRIUM_FT_DATABASE_URL) that is not a URL of SQLite or PostgreSQL: exit status 2, saying what to give; no SQLite file made in its place"
    for args, env in [(['--database-url', url], {}), ([], {'CEREBRIUM_FT_DATABASE_URL': url})]:
        for cmd in (['serve', '--port', str(free_port())], ['projects', 'list']):
            r = run_cli(*cmd, '--data-dir', tmp_path/'data', *args, cwd=tmp_path, env={**os.environ, **env}, timeout=60)
            assert r.returncode == 2 and said in r.stderr and "pip install 'cerebrium-ft[postgres]'" not in r.stderr, r.stderr
            assert (args and '--database-url' in r.stderr) or 'CEREBRIUM_FT_DATABASE_URL' in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []

def test_two_servers_share_a_job_table_in_postgresql(tmp_path, tiny_model, data, postgres_db):
    "serve --database-url: two servers, each with its own data folder, share projects, keys and jobs in a real PostgreSQL; a job runs on the server it was submitted to, the other shows it, leaves it be, sends its files' requests to its server, and can cancel it"
    a = Server(tmp_path/'a', model_dir=tiny_model, database_url=postgres_db).start()
    b = Server(tmp_path/'b', model_dir=tiny_model, database_url=postgres_db).start()
    try:
        key = a.key = b.key = next(w for w in a.output().split() if w.startswith('cft_'))  # made by the first start; the second finds the project
        assert 'jobs table in ' in a.output() and 'cft_' not in b.output()
        jid = json.loads(submit(a, tiny_model, data, key=key, steps=10).stdout)['id']
        done = wait_for(a, jid, lambda j: j['status'] in ('succeeded', 'failed'), timeout=240)
        assert done['status'] == 'succeeded' and done['server'], done
        assert job(b, jid)['status'] == 'succeeded'
        r = requests.get(f"{b.url}/v1/jobs/{jid}/results", headers={'Authorization': f"Bearer {key}"})
        assert r.status_code == 409 and f"runs on another job server ({done['server']})" in r.json()['detail']
        assert run_cli('download-model', jid, key, '--output', tmp_path/'a.zip', '--url', a.url).returncode == 0
        long = json.loads(submit(a, tiny_model, data, key=key, steps=100_000).stdout)['id']
        wait_for(a, long, lambda j: j['status'] == 'running' and j['step'] > 0, timeout=240)
        time.sleep(2)  # b's executor ticks meanwhile: a job running on a is not b's to fail as lost
        assert job(b, long)['status'] == 'running'
        r = run_cli('cancel-job', long, key, '--url', b.url)
        assert r.returncode == 0, r.stderr
        assert wait_for(a, long, lambda j: j['status'] != 'running', timeout=30)['status'] == 'cancelled'  # a ended it
    finally: a.stop(); b.stop()
    r = run_cli('serve', '--data-dir', tmp_path/'c', '--port', str(free_port()), '--database-url', 'postgresql+psycopg://nobody@/nothing?host=/nonexistent')
    assert r.returncode == 1 and 'cannot open the job database (/nothing?host=/nonexistent)' in r.stderr, r.stderr
    r = run_cli('projects', 'list', '--data-dir', tmp_path/'a', '--database-url', postgres_db)
    assert r.returncode == 0 and 'default' in r.stdout
    r = run_cli('projects', 'list', '--data-dir', tmp_path/'c', env={**os.environ, 'CEREBRIUM_FT_DATABASE_URL': postgres_db})  # the URL from the environment
    assert r.returncode == 0 and 'default' in r.stdout
