"A training run killed with SIGKILL after a checkpoint, started again with the same command, ends as an uninterrupted run does"
import csv, json, os, signal, subprocess, time
from safetensors.torch import load_file
from diffusers import StableDiffusionPipeline
from cerebrium_ft.results import load_results
from cerebrium_ft.testing import make_subject_images
from conftest import BIN, run_cli

STEPS = 240

def train_args(model, data, out):
    ta = dict(resolution=64, max_train_steps=STEPS, checkpointing_steps=20, num_validation_images=1, validation_epochs=1000)
    return ['train', 'robot', model, data, 'a photo of sks robot', '--output', out, '--training-args', json.dumps(ta)]

def test_killed_run_resumes(tiny_model, tmp_path):
    data = tmp_path/'robot'; make_subject_images(data, n=6, size=64)
    out = tmp_path/'run'
    p = subprocess.Popen([str(BIN/'cerebrium-ft'), *map(str, train_args(tiny_model, data, out))],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (out/'checkpoints'/'step_000040').exists() and p.poll() is None and time.time() < deadline: time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed: make STEPS larger"
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert not (out/'manifest.json').exists()
    killed_at = max(int(r['step']) for r in csv.DictReader(open(out/'metrics.csv')))

    r = run_cli(*train_args(tiny_model, data, out))
    assert r.returncode == 0, r.stderr
    steps = [int(r['step']) for r in csv.DictReader(open(out/'metrics.csv'))]
    assert steps == list(range(1, STEPS + 1)), "one continuous metrics history"
    assert 'resuming from step_0000' in (out/'logs.txt').read_text()
    assert json.loads((out/'manifest.json').read_text())['steps'] == STEPS

    whole = tmp_path/'whole'
    assert run_cli(*train_args(tiny_model, data, whole)).returncode == 0
    a = load_file(out/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors')
    b = load_file(whole/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors')
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"the resumed run (killed near step {killed_at}) drifted from the uninterrupted one by {worst}"
    rows = lambda d: [(r['step'], r['loss']) for r in csv.DictReader(open(d/'metrics.csv'))]
    assert rows(out) == rows(whole)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    load_results(pipe, out)
