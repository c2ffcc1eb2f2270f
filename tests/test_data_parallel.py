"One run on several processes (the `gpus` setting), tested as CPU processes on gloo: it trains as one process does with the same global batch, and a killed run resumes"
import csv, json, os, signal, subprocess, time
from safetensors.torch import load_file
from diffusers import StableDiffusionPipeline
from cerebrium_ft.results import load_results
from cerebrium_ft.testing import make_subject_images
from conftest import BIN, run_cli

WEIGHTS = 'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors'

def train_args(model, data, out, **settings):
    ta = dict(resolution=64, mixed_precision='no', num_validation_images=1, validation_inference_steps=2, **settings)
    return ['train', 'robot', model, data, 'a photo of sks robot', '--output', out, '--device', 'cpu', '--training-args', json.dumps(ta)]

def rows(out): return list(csv.DictReader(open(out/'metrics.csv')))

def assert_same_run(a, b, tol=1e-4):
    "Runs `a` and `b` logged the same losses and scores, and ended with the same LoRA, within rounding"
    ra, rb = rows(a), rows(b)
    assert [r['step'] for r in ra] == [r['step'] for r in rb]
    for x, y in zip(ra, rb):
        for k in ('loss', 'instance_loss', 'prior_loss', 'heldout_loss', 'score'):
            if x[k] or y[k]: assert abs(float(x[k]) - float(y[k])) <= tol * max(1.0, abs(float(y[k]))), (k, x, y)
    wa, wb = load_file(a/WEIGHTS), load_file(b/WEIGHTS)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-4, f"the LoRAs differ by {worst}"

def test_two_processes_train_as_one_with_the_same_global_batch(tiny_model, tmp_path):
    "gpus 2 with train_batch_size 1 (per process) against one process with train_batch_size 2: the same batches, noise, losses, scores and weights; with prior preservation and mirrored images"
    data = tmp_path/'robot'; make_subject_images(data, n=6, size=64)
    prior = ['--num-prior-class-images', '4', '--prior-class-prompt', 'a photo of a robot']
    common = dict(max_train_steps=9, random_flip=True, validation_epochs=2, sample_batch_size=2, scale_lr=True)
    one, two = tmp_path/'one', tmp_path/'two'
    r = run_cli(*train_args(tiny_model, data, one, train_batch_size=2, **common), *prior)
    assert r.returncode == 0, r.stderr
    r = run_cli(*train_args(tiny_model, data, two, train_batch_size=1, gpus=2, **common), *prior)
    assert r.returncode == 0, r.stderr
    log = (two/'logs.txt').read_text()
    assert 'data-parallel: 2 processes on cpu (gloo), started by torchrun' in log
    assert "each step's batch of up to 2 images (train_batch_size 1 per process x 2 processes) is split across the processes" in log
    assert 'rank 1' not in log, "the second process logs only its errors"
    assert "prior preservation: 4 class images of 'a photo of a robot'" in log
    assert_same_run(two, one)
    m = json.loads((two/'manifest.json').read_text())
    assert m['steps'] == 9 and m['class_images'] == 4
    assert m['learning_rate'] == json.loads((one/'manifest.json').read_text())['learning_rate'] == 5e-4 * 2, "scale_lr counts the processes"
    assert [c['step'] for c in m['checkpoints']] == [c['step'] for c in json.loads((one/'manifest.json').read_text())['checkpoints']]
    load_results(StableDiffusionPipeline.from_pretrained(tiny_model), two)

def test_a_killed_two_process_run_resumes(tiny_model, tmp_path):
    "SIGKILL to the whole run (torchrun and both processes) after a checkpoint; the same command resumes it, and it ends as one process with the same global batch does"
    data = tmp_path/'robot'; make_subject_images(data, n=6, size=64)
    settings = dict(max_train_steps=150, checkpointing_steps=20, validation_epochs=1000)
    out = tmp_path/'run'
    p = subprocess.Popen([str(BIN/'cerebrium-ft'), *map(str, train_args(tiny_model, data, out, train_batch_size=1, gpus=2, **settings))],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out/'checkpoints'/'step_000040'/'state.pt').exists() and p.poll() is None and time.time() < deadline: time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed: make max_train_steps larger"
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert not (out/'manifest.json').exists()
    r = run_cli(*train_args(tiny_model, data, out, train_batch_size=1, gpus=2, **settings))
    assert r.returncode == 0, r.stderr
    assert [int(r['step']) for r in rows(out)] == list(range(1, 151)), "one continuous metrics history"
    assert 'resuming from step_0000' in (out/'logs.txt').read_text()
    whole = tmp_path/'whole'
    r = run_cli(*train_args(tiny_model, data, whole, train_batch_size=2, **settings))
    assert r.returncode == 0, r.stderr
    assert_same_run(out, whole)

def test_train_rank_is_torchruns_alone(tmp_path, tiny_model):
    "train-rank outside torchrun, or on a folder no run started, says what to run instead"
    r = run_cli('train-rank', tmp_path)
    assert r.returncode == 2 and 'holds no job.json: train-rank runs a process of a run that train or run-job started' in r.stderr, r.stderr
    data = tmp_path/'robot'; make_subject_images(data, n=6, size=64)
    (tmp_path/'run').mkdir(); (tmp_path/'run'/'job.json').write_text(json.dumps(dict(name='robot', hf_model_path=str(tiny_model), dataset=str(data), training_prompt='a photo of sks robot')))
    r = run_cli('train-rank', tmp_path/'run')
    assert r.returncode == 2 and 'train-rank runs under torchrun (it sets RANK and WORLD_SIZE); to train, use cerebrium-ft train' in r.stderr, r.stderr
