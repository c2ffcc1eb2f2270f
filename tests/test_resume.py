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
    deadline = time.time() + 1200  # generous: a busy machine trains slowly
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

def _latest_checkpoint_step(out):
    steps = [int(p.name[5:]) for p in (out/'checkpoints').glob('step_*') if (p/'state.pt').exists()]
    return max(steps, default=None)

def _logged_step(out):
    "The newest step in metrics.csv"
    try: return max((int(r['step']) for r in csv.DictReader(open(out/'metrics.csv'))), default=0)
    except (OSError, ValueError): return 0

def test_a_default_job_killed_between_checkpoints_resumes(tiny_model, tmp_path):
    """The default settings (12 images, batch 2, 30 epochs = 180 steps; only the resolution is the tiny model's), killed between two checkpoints:
    started again it resumes from the newest one, trains the lost steps again and ends as an uninterrupted run does. (How far apart checkpoints
    are, an epoch or 50 times a checkpoint's write where epochs are quicker, is `CheckpointClock`'s, tested in the train notebook.)"""
    data = tmp_path/'robot'; make_subject_images(data, n=12, size=64)
    args = lambda out: ['train', 'robot', tiny_model, data, 'a photo of sks robot', '--output', out, '--training-args', '{"resolution": 64}']
    for attempt in range(3):  # the kill must land after a checkpoint and before the next one
        out = tmp_path/f"run{attempt}"
        p = subprocess.Popen([str(BIN/'cerebrium-ft'), *map(str, args(out))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 1200  # generous: a busy machine trains slowly
        while p.poll() is None and time.time() < deadline:
            ck = _latest_checkpoint_step(out)
            if ck is not None and ck < _logged_step(out) < 170: break
            time.sleep(0.01)
        assert p.poll() is None, "the run ended before it could be killed"
        os.killpg(p.pid, signal.SIGKILL); p.wait()
        ck, trained = _latest_checkpoint_step(out), _logged_step(out)
        if trained > ck: break
    assert trained > ck, f"could not kill between checkpoints: {ck}, {trained}"
    assert not (out/'manifest.json').exists()

    r = run_cli(*args(out))
    assert r.returncode == 0, r.stderr
    steps = [int(r['step']) for r in csv.DictReader(open(out/'metrics.csv'))]
    assert steps == list(range(1, 181)), "the steps after the checkpoint were trained again and logged once"
    assert f"resuming from step_{ck:06d}: step {ck} of 180" in (out/'logs.txt').read_text()
    whole = tmp_path/'whole'
    assert run_cli(*args(whole)).returncode == 0
    a = load_file(out/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors')
    b = load_file(whole/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors')
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert sorted(p.name for p in (out/'validation').glob('epoch_*')) == ['epoch_0010', 'epoch_0020', 'epoch_0030']
    scored = lambda d: [(int(r['step']), float(r['score'])) for r in csv.DictReader(open(d/'metrics.csv')) if r['score']]
    assert [s for s, _ in scored(out)] == [s for s, _ in scored(whole)] == [60, 120, 180]  # a scored checkpoint per validation, kept across the kill
    assert max(abs(a - b) for (_, a), (_, b) in zip(scored(out), scored(whole))) < 1e-4
    ma, mb = (json.loads((d/'manifest.json').read_text()) for d in (out, whole))
    assert ma['best']['checkpoint'] == mb['best']['checkpoint'] and [c['name'] for c in ma['checkpoints']] == ['step_000060', 'step_000120', 'final']
