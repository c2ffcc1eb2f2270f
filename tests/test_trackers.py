"report_to: the losses, learning rate, checkpoint scores and validation images also go to TensorBoard or W&B (offline here), read back from their own files"
import csv, glob, json, os, signal, struct, subprocess, time
from conftest import BIN, run_cli
from cerebrium_ft.results import RunDir
from cerebrium_ft.testing import make_subject_images
from cerebrium_ft.train import tracker_run_id

def train_args(model, data, out, **settings):
    ta = dict(resolution=64, mixed_precision='no', num_validation_images=2, validation_inference_steps=2,
              validation_prompt=['a photo of sks robot', 'sks robot on a beach'], **settings)
    return ['train', 'robot', model, data, 'a photo of sks robot', '--output', out, '--device', 'cpu', '--training-args', json.dumps(ta)]

def metrics(out): return {int(r['step']): r for r in csv.DictReader(open(out/'metrics.csv'))}

def logged_step(out):
    "The newest step in metrics.csv, which a run appends to as it goes"
    try: return max(metrics(out), default=0)
    except (OSError, ValueError): return 0

def tensorboard_run(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(folder), size_guidance={'images': 0, 'scalars': 0}); ea.Reload()
    return ea

def test_tensorboard_gets_the_run_and_a_resumed_run_drops_what_its_checkpoint_did_not_keep(tiny_model, tmp_path):
    data = tmp_path/'robot'; make_subject_images(data, n=6, size=64)
    out, settings = tmp_path/'run', dict(report_to='tensorboard', max_train_steps=120, checkpointing_steps=20, validation_epochs=20)
    p = subprocess.Popen([str(BIN/'cerebrium-ft'), *map(str, train_args(tiny_model, data, out, **settings))],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while p.poll() is None and time.time() < deadline:  # until it has logged steps past a checkpoint, which the resumed run trains again
        ck = max((int(c.name[5:]) for c in (out/'checkpoints').glob('step_*') if (c/'state.pt').exists()), default=None) if (out/'checkpoints').exists() else None
        if ck is not None and logged_step(out) > ck: break
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be killed: make max_train_steps larger"
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert logged_step(out) > ck
    r = run_cli(*train_args(tiny_model, data, out, **settings))
    assert r.returncode == 0, r.stderr
    assert 'resuming from step_0000' in (out/'logs.txt').read_text()
    ea, rows = tensorboard_run(out/'tensorboard'/'cerebrium-ft'), metrics(out)
    loss = [(e.step, e.value) for e in ea.Scalars('loss')]
    assert [s for s, _ in loss] == list(range(1, 121)), "each step once: the steps the stopped run logged past its checkpoint are purged"
    assert all(abs(v - float(rows[s]['loss'])) < 1e-4 for s, v in loss)
    assert [e.step for e in ea.Scalars('lr')] == list(range(1, 121))
    score = [(e.step, e.value) for e in ea.Scalars('score')]
    assert [s for s, _ in score] == [s for s, r in rows.items() if r['score']] == [60, 120]  # a validation every 20 epochs of 3 steps, and the final one
    assert all(abs(v - float(rows[s]['score'])) < 1e-4 for s, v in score)
    assert sorted(ea.Tags()['images']) == ['validation/0: a photo of sks robot', 'validation/1: sks robot on a beach']
    assert [(e.step, e.width, e.height) for e in ea.Images('validation/1: sks robot on a beach')] == [(60, 128, 64), (120, 128, 64)]  # the two images of each validation side by side

def wandb_records(run_dir):
    "The protobuf records of a W&B run file (LevelDB's log format: 32 KiB blocks of records, each a 7-byte header and a piece of one record)"
    from wandb.proto import wandb_internal_pb2 as pb
    raw = open(glob.glob(f"{run_dir}/run-*.wandb")[0], 'rb').read()
    i, part, block = 7, b'', 32768  # after W&B's own 7-byte header
    while i + 7 <= len(raw):
        if block - i % block < 7: i += block - i % block; continue
        n, kind = struct.unpack('<HB', raw[i + 4:i + 7]); data = raw[i + 7:i + 7 + n]; i += 7 + n
        if kind == 0 and n == 0: break
        part += data
        if kind in (1, 4):
            r = pb.Record(); r.ParseFromString(part); yield r; part = b''

def test_wandb_offline_gets_the_run(tiny_model, tmp_path):
    data = tmp_path/'robot'; make_subject_images(data, n=6, size=64)
    out = tmp_path/'run'
    r = run_cli(*train_args(tiny_model, data, out, report_to='wandb', max_train_steps=12, validation_epochs=2, rank=8),
                '--num-prior-class-images', '2', '--prior-class-prompt', 'a photo of a robot', env={**os.environ, 'WANDB_MODE': 'offline'})
    assert r.returncode == 0, r.stderr
    runs = glob.glob(str(out/'wandb'/'offline-run-*'))
    assert len(runs) == 1 and runs[0].endswith(tracker_run_id(RunDir(out))), runs  # the folder's own id: a resumed run logs on into it
    history, config, name = {}, {}, None
    for rec in wandb_records(runs[0]):
        kind = rec.WhichOneof('record_type')
        if kind == 'history':
            for i in rec.history.item:  # a nested key (an image panel's fields) as nested dicts
                *outer, k = [i.key] if i.key else list(i.nested_key); row = history.setdefault(rec.history.step.num, {})
                for o in outer: row = row.setdefault(o, {})
                row[k] = json.loads(i.value_json)
        elif kind == 'run': name = rec.run.display_name; config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == 'config': config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    assert name == 'robot'
    value = lambda k: config[k]['value'] if isinstance(config[k], dict) else config[k]  # as W&B's versions nest it, or not
    assert (value('rank'), value('report_to'), value('job')) == (8, 'wandb', 'robot')
    rows = metrics(out)
    assert sorted(s for s in history if 'loss' in history[s]) == list(range(1, 13))
    assert all(abs(history[s][k] - float(rows[s][k])) < 1e-4 for s in range(1, 13) for k in ('loss', 'instance_loss', 'prior_loss', 'lr'))
    assert [s for s in sorted(history) if 'score' in history[s]] == [6, 12]
    for s in (6, 12):
        for k in ('validation/0', 'validation/1'):
            assert history[s][k]['count'] == 2 and history[s][k]['_type'] == 'images/separated', history[s][k]
    assert 'sks robot on a beach (seed 43, step 12)' in history[12]['validation/1']['captions']

def test_a_tracker_that_does_not_import_stops_the_run_before_it_starts(tiny_model, tmp_path):
    fake = tmp_path/'site'/'wandb'; fake.mkdir(parents=True); (fake/'__init__.py').write_text("raise ImportError('wandb is broken here')")
    data = tmp_path/'robot'; make_subject_images(data, n=6, size=64)
    r = run_cli(*train_args(tiny_model, data, tmp_path/'run', report_to='wandb', max_train_steps=4), env={**os.environ, 'PYTHONPATH': str(tmp_path/'site')})
    assert r.returncode == 1, r.stderr
    assert "report_to wandb needs the wandb package, which does not import here (wandb is broken here): pip install wandb (or 'cerebrium-ft[trackers]'), or set report_to none" in r.stderr, r.stderr
    assert not (tmp_path/'run'/'metrics.csv').exists()
