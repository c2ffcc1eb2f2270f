"--json on every command that reports something: one JSON object on stdout, for scripts (login's is in test_service.py)"
import json, subprocess, time
from pathlib import Path
import requests
from conftest import BIN, run_cli
from test_service import free_port

def test_the_offline_commands_print_one_json_object(tmp_path):
    "tiny-model, sample-dataset, train and generate, as a script would chain them"
    m = json.loads(run_cli('tiny-model', tmp_path/'m', '--json').stdout)
    assert m == dict(path=str(tmp_path/'m'), family='sd1')
    d = json.loads(run_cli('sample-dataset', tmp_path/'d', '--n', 6, '--size', 64, '--json').stdout)
    assert d['folder'] == str(tmp_path/'d') and len(d['images']) == 6 and all(Path(p).is_file() for p in d['images'])
    ta = dict(resolution=64, max_train_steps=2, num_validation_images=1, validation_epochs=1, mixed_precision='no')
    r = run_cli('train', 'robot', m['path'], d['folder'], 'a photo of sks robot', '--output', tmp_path/'run', '--training-args', json.dumps(ta), '--json')
    t = json.loads(r.stdout)
    assert t['results'] == str(tmp_path/'run') and t['steps'] == 2 and Path(t['weights']).is_file() and Path(t['kohya']).is_file()
    assert t['best']['checkpoint'] in ('step_000001', 'final') and list(t['time']) == ['setup', 'class images', 'steps', 'checkpoints', 'validation', 'saving']
    r = run_cli('generate', t['results'], 'a photo of sks robot', '-n', 2, '--steps', 2, '--output', tmp_path/'g.png', '--json')
    g = json.loads(r.stdout)
    lines = [l for l in r.stderr.splitlines() if l.startswith('generating 2 images: ')]  # its progress, as lines off a terminal
    assert [l.split(',')[0] for l in lines] == ['generating 2 images: step 1 of 2', 'generating 2 images: step 2 of 2'] and lines[0].endswith(' left'), r.stderr
    assert g == dict(grid=str(tmp_path/'g.png'), prompt='a photo of sks robot', seeds=[42, 43], use='final') and (tmp_path/'g.png').is_file()

def test_serve_prints_its_start_as_json(tmp_path):
    "serve --json: the start line as one JSON object, with the first start's project and key, then it serves"
    port = free_port()
    p = subprocess.Popen([str(BIN/'cerebrium-ft'), 'serve', '--port', str(port), '--data-dir', str(tmp_path/'data'), '--json', '--gpus', 'none'],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        while not lines or lines[-1] != '}\n': lines.append(p.stdout.readline()); assert lines[-1], ''.join(lines)
        start = json.loads(''.join(lines))
        assert (start['url'], start['workers'], start['gpus'], start['data_dir']) == (f"http://127.0.0.1:{port}", 1, [], str(tmp_path/'data'))
        key = start['created_project']['api_key']
        for _ in range(100):
            try: r = requests.get(f"{start['url']}/v1/me", headers={'Authorization': f"Bearer {key}"}, timeout=1); break
            except requests.ConnectionError: time.sleep(0.1)
        assert r.json() == dict(project_id=start['created_project']['project_id'])
    finally: p.terminate(); p.wait(timeout=30)
