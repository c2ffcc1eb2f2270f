"Training on the tiny pipeline: the results contract, loading, learning, prior preservation, and every seed kwarg's effect"
import csv, json, math, re
from pathlib import Path
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from cerebrium_ft import train as T
from cerebrium_ft.config import JobSpec, SettingsError
from cerebrium_ft.families import encode_prompts
from cerebrium_ft.results import RunDir, load_pipeline, load_results
from cerebrium_ft.testing import build_tiny_pipeline, make_subject_images

@pytest.fixture(scope='module')
def model(tmp_path_factory): return str(build_tiny_pipeline(tmp_path_factory.mktemp('m')/'tiny-sd'))

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('d')/'robot'
    make_subject_images(d, n=6, size=64)
    return d

def spec(model, data, **kw):
    ta = {'resolution': 64, 'num_validation_images': 0, **kw.pop('training_args', {})}
    return JobSpec(**{**dict(name='robot', hf_model_path=model, dataset=str(data), training_prompt='a photo of sks robot'), **kw}, training_args=ta)

def rows(out): return list(csv.DictReader(open(Path(out)/'metrics.csv')))
def col(out, k): return [float(r[k]) for r in rows(out)]
def manifest(out): return json.loads((Path(out)/'manifest.json').read_text())

def render(pipe, seed=0):
    return np.asarray(pipe('a photo of sks robot', num_inference_steps=3, generator=torch.Generator().manual_seed(seed)).images[0], dtype=float)

def tiny_pipe(model):
    p = StableDiffusionPipeline.from_pretrained(model); p.set_progress_bar_config(disable=True); return p

# --- the results, loading, learning ----------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained(model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp('r')/'run'
    T.train(spec(model, data, training_args=dict(max_train_steps=40, learning_rate=1e-2, rank=4, lora_alpha=8, num_validation_images=2,
                                                validation_epochs=5)), out, progress=False)
    return out

def test_run_writes_the_results_contract(trained):
    for f in ['manifest.json', 'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors', 'metrics.csv', 'loss.png', 'logs.txt',
              'lora_kohya.safetensors', 'validation/epoch_0005/00.png', 'validation/epoch_0014/01.png']:
        assert (trained/f).is_file(), f
    m = manifest(trained)
    assert m['lora'] == dict(rank=4, alpha=8, targets=['to_q', 'to_k', 'to_v', 'to_out.0'], format='diffusers',
                             weights='checkpoints/final/attn_procs/pytorch_lora_weights.safetensors')
    assert set(m['versions']) >= {'diffusers', 'peft', 'torch'} and m['steps'] == 40
    assert set(m['sha256']) == {'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors', 'lora_kohya.safetensors',
                                'checkpoints/step_000015/attn_procs/pytorch_lora_weights.safetensors', 'checkpoints/step_000030/attn_procs/pytorch_lora_weights.safetensors'}
    assert [c['name'] for c in m['checkpoints']] == ['step_000015', 'step_000030', 'final']  # a usable LoRA at each validation (every 5 epochs of 3 steps)
    assert json.loads((trained/'progress.json').read_text())['phase'] == 'done'

def test_the_run_says_where_its_time_went(trained):
    "The manifest's time splits the run into its phases, which add up to it; the log's last line says the same"
    m = manifest(trained); t = m['time']
    assert list(t) == list(T.JOB_PHASES) and all(v >= 0 for v in t.values()) and t['steps'] > 0 and t['validation'] > 0
    assert abs(sum(t.values()) - m['train_seconds']) <= 0.1 * m['train_seconds'] + 0.5  # the phases are the run, all of it
    last = (trained/'logs.txt').read_text().strip().splitlines()[-1]
    assert last.endswith(f"time: {sum(t.values()):.1f} s in all: " + ', '.join(f"{k} {v:.1f} s" for k, v in t.items())), last

def test_lora_loads_in_diffusers_and_changes_the_output(trained, model):
    pipe = tiny_pipe(model)
    before = render(pipe)
    pipe.load_lora_weights(str(trained/'checkpoints/final/attn_procs'))
    after = render(pipe)
    assert np.abs(after - before).mean() > 1.0

def test_kohya_file_loads_to_the_same_model(trained, model):
    "The kohya layout carries alpha explicitly; equal outputs also show the diffusers file kept alpha=8 != rank=4"
    a, b = tiny_pipe(model), tiny_pipe(model)
    a.load_lora_weights(str(trained/'checkpoints/final/attn_procs'))
    b.load_lora_weights(str(trained), weight_name='lora_kohya.safetensors')
    assert np.abs(render(a) - render(b)).max() <= 1.0

def test_denoising_loss_on_the_instance_images_goes_down(trained, model, data):
    pipe = tiny_pipe(model)
    pix = torch.stack(T.load_pixels(sorted(data.glob("*.jpg")), 64)[0])
    with torch.no_grad():
        latents = pipe.vae.encode(pix).latent_dist.mean * pipe.vae.config.scaling_factor
        emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, ['a photo of sks robot'], 'cpu', torch.float32).expand(len(pix), -1, -1)
        def loss(): return T.denoising_loss(pipe.unet, pipe.scheduler.__class__.from_config(pipe.scheduler.config), latents, emb,
                                            torch.Generator().manual_seed(123))[0].item()
        base = loss()
        load_results(pipe, trained)
        tuned = loss()
    assert tuned < base * 0.9, (base, tuned)

# --- prior preservation ------------------------------------------------------------------------------------

def test_prior_preservation_pairs_every_batch_and_logs_the_prior_loss(model, data, tmp_path, monkeypatch):
    seen, real = [], T.denoising_loss
    def spy(unet, sched, latents, emb, gen, n_prior=0, *rest, **kw):
        if torch.is_grad_enabled(): seen.append((latents.shape[0], n_prior))  # the training steps, not the scoring of checkpoints
        return real(unet, sched, latents, emb, gen, n_prior, *rest, **kw)
    monkeypatch.setattr(T, 'denoising_loss', spy)
    out = tmp_path/'run'
    T.train(spec(model, data, prior_class_prompt='a photo of a robot', num_prior_class_images=4,
                 training_args=dict(num_train_epochs=2, prior_loss_weight=0.5)), out, cache=tmp_path/'cache', progress=False)
    assert seen and all(n > 0 and n * 2 == b for b, n in seen), seen  # half of every batch is class examples
    r = rows(out)
    assert len(r) == 6 and all(x['prior_loss'] and x['instance_loss'] for x in r)
    for x in r: assert math.isclose(float(x['loss']), float(x['instance_loss']) + 0.5 * float(x['prior_loss']), rel_tol=1e-4)
    assert manifest(out)['class_images'] == 4
    c = manifest(out)['checkpoints'][-1]  # the score adds the prior's loss on class images, weighted as in training
    assert c['heldout_prior_loss'] > 0 and math.isclose(c['score'], c['heldout_loss'] + 0.5 * c['heldout_prior_loss'], rel_tol=1e-6)
    assert len(list((tmp_path/'cache').rglob('class_*.png'))) == 4
    assert '(4 generated now)' in (out/'logs.txt').read_text()

# --- each seed kwarg, observed -----------------------------------------------------------------------------

def run(model, data, tmp_path, name='run', **ta):
    out = tmp_path/name
    T.train(spec(model, data, training_args=ta), out, progress=False)
    return out

@pytest.mark.parametrize('schedule,check', [
    ('constant', lambda lr: all(math.isclose(x, 1e-3) for x in lr)),
    ('constant_with_warmup', lambda lr: lr[:3] == [0.0, 0.5e-3, 1e-3] and all(math.isclose(x, 1e-3) for x in lr[2:])),
    ('linear', lambda lr: lr[2] == 1e-3 and all(a > b for a, b in zip(lr[2:], lr[3:])) and lr[-1] < 2.5e-4),
    ('cosine', lambda lr: lr[2] == 1e-3 and all(a > b for a, b in zip(lr[2:], lr[3:])) and math.isclose(lr[5], 1e-3 * (1 + math.cos(math.pi * 3 / 6)) / 2)),
    ('cosine_with_restarts', lambda lr: lr[2:8] == [1e-3, 0.75e-3, 0.25e-3] * 2),  # 2 cycles of 3 steps after warmup
    ('polynomial', lambda lr: lr[2] == 1e-3 and all(a > b for a, b in zip(lr[2:], lr[3:]))),
])
def test_lr_schedule_and_warmup(model, data, tmp_path, schedule, check):
    out = run(model, data, tmp_path, lr_schedule=schedule, warmup_steps=2, max_train_steps=8, learning_rate=1e-3, lr_num_cycles=2)
    lr = col(out, 'lr')
    assert len(lr) == 8 and check(lr), lr
    if schedule != 'constant': assert lr[0] == 0.0  # warmup starts from zero

def test_lr_scheduler_alias_and_scale_lr(model, data, tmp_path):
    out = tmp_path/'a'
    T.train(JobSpec.from_dict({**spec(model, data).to_dict(), 'training_args': dict(
        resolution=64, num_validation_images=0, lr_scheduler='linear', lr_warmup_steps=1, max_train_steps=3)}), out, progress=False)
    assert col(out, 'lr')[0] == 0.0 and col(out, 'lr')[1] == 5e-4  # the seed's default learning rate
    out = run(model, data, tmp_path, 'b', scale_lr=True, learning_rate=1e-4, gradient_accumulation_steps=3, train_batch_size=2, max_train_steps=2)
    assert all(math.isclose(x, 1e-4 * 3 * 2) for x in col(out, 'lr'))

def test_epochs_batch_size_accumulation_and_max_steps(model, data, tmp_path):
    assert len(rows(run(model, data, tmp_path, 'e', num_train_epochs=2))) == 6           # 6 images, batch 2: 3 steps an epoch
    assert len(rows(run(model, data, tmp_path, 'b', num_train_epochs=2, train_batch_size=3))) == 4
    acc = run(model, data, tmp_path, 'g', num_train_epochs=2, gradient_accumulation_steps=2)  # 3 batches: steps after 2, and after the 3rd
    assert [int(r['epoch']) for r in rows(acc)] == [1, 1, 2, 2]
    m = run(model, data, tmp_path, 'm', num_train_epochs=30, max_train_steps=5)
    assert len(rows(m)) == 5 and manifest(m)['plan']['epochs'] == 2

def test_validation_epochs(model, data, tmp_path):
    out = run(model, data, tmp_path, num_train_epochs=5, validation_epochs=2, num_validation_images=1)
    assert sorted(p.name for p in (out/'validation').glob('epoch_*')) == ['epoch_0002', 'epoch_0004', 'epoch_0005']

def test_use_8bit_adam_and_its_fallback(model, data, tmp_path, monkeypatch):
    assert manifest(run(model, data, tmp_path, 'a', max_train_steps=2))['optimizer'] == 'AdamW8bit'
    assert manifest(run(model, data, tmp_path, 'b', max_train_steps=2, use_8bit_adam=False))['optimizer'] == 'AdamW'
    monkeypatch.setattr(T, '_adamw8bit', lambda device: 'RuntimeError: no 8-bit kernels for this CPU')
    out = run(model, data, tmp_path, 'c', max_train_steps=2)
    assert manifest(out)['optimizer'] == 'AdamW'
    assert 'use_8bit_adam: bitsandbytes cannot run on cpu here (RuntimeError: no 8-bit kernels' in (out/'logs.txt').read_text()

@pytest.mark.parametrize('amx', [True, False], ids=['cpu-picks-bf16', 'cpu-picks-fp32'])
def test_trainings_one_after_another_in_one_process(model, data, tmp_path, monkeypatch, amx):
    "A notebook kernel trains again and again with other precisions: accelerate's one-per-process state must not stop it"
    from cerebrium_ft import speed
    monkeypatch.setattr(speed, 'cpu_has_amx', lambda: amx)       # what 'auto' picks, whatever this CPU is
    monkeypatch.setattr(speed, 'cpu_has_bf16', lambda: True)     # bf16 asked for runs (emulated where the CPU has no bf16)
    runs = [run(model, data, tmp_path, f"{i}-{p}", max_train_steps=2, mixed_precision=p) for i, p in enumerate(['auto', 'no', 'bf16', 'auto'])]
    test = [manifest(r)['precision'] for r in runs]
    assert test == (['bf16', 'no', 'bf16', 'bf16'] if amx else ['no', 'no', 'bf16', 'no']), test

def test_fp16_asked_for_on_a_cpu_trains_in_fp32_and_says_so(model, data, tmp_path):
    fp16 = run(model, data, tmp_path, 'fp16', max_train_steps=1, mixed_precision='fp16')  # a CUDA choice
    assert manifest(fp16)['precision'] == 'no' and 'mixed_precision=fp16 is not supported on this cpu' in (fp16/'logs.txt').read_text()

def test_fp16_as_gpus_without_bf16_train_it_keeps_the_vae_in_fp32(model, data, tmp_path, monkeypatch):
    "fp16 autocast with loss scaling (what 'auto' picks on a GPU without bf16), forced on this CPU: the VAE stays in fp32 and gets its pixels in fp32 (on an H200 they came in fp16 and the first encode failed)"
    monkeypatch.setattr(T, 'resolve_precision', lambda setting, device: 'fp16')
    out = run(model, data, tmp_path, 'fp16', max_train_steps=4, mixed_precision='fp16', num_validation_images=1, validation_epochs=1)
    assert manifest(out)['precision'] == 'fp16' and all(math.isfinite(l) for l in col(out, 'loss'))

class InfiniteGradient(torch.autograd.Function):
    "The identity, whose gradient is infinite: what an overflowing backward pass hands the loss scaler"
    @staticmethod
    def forward(ctx, x): return x.clone()
    @staticmethod
    def backward(ctx, g): return g * float('inf')

def test_a_loss_that_is_not_a_number_stops_the_run_and_keeps_the_checkpoints_before_it(model, data, tmp_path, monkeypatch):
    "fp32 or bf16: from the first nan loss the LoRA is nan, so the run stops there, saying what to change, with the metrics written and the checkpoints before it kept"
    loss, calls = T.denoising_loss, []
    def going_nan(*a, **k):
        out = loss(*a, **k)
        if torch.is_grad_enabled(): calls.append(1)
        return (out[0] * float('nan'), *out[1:]) if len(calls) >= 4 else out
    monkeypatch.setattr(T, 'denoising_loss', going_nan)
    with pytest.raises(T.TrainingError, match=r"training diverged: the loss was nan at step 4 \(learning rate 0.0005\); train again in a new --output folder with a lower learning_rate"):
        T.train(spec(model, data, training_args=dict(max_train_steps=12, checkpointing_steps=3, mixed_precision='no')), tmp_path/'run', progress=False)
    steps = [int(r['step']) for r in rows(tmp_path/'run')]
    assert steps[:4] == [1, 2, 3, 4] and math.isnan(col(tmp_path/'run', 'loss')[3])
    assert [p.name for p in RunDir(tmp_path/'run').checkpoints.glob('step_*') if (p/'state.pt').exists()] == ['step_000003']  # none saved with a nan LoRA
    assert RunDir(tmp_path/'run').latest_checkpoint().name == 'step_000003'
    assert not (tmp_path/'run/manifest.json').exists()

@pytest.fixture
def fp16_with_loss_scaling(monkeypatch):
    "fp16 as a GPU trains it, on this CPU: autocast, and the GradScaler that accelerate gives GPUs only"
    monkeypatch.setattr(T, 'resolve_precision', lambda setting, device: 'fp16')
    accelerator = T.fresh_accelerator
    def with_loss_scaling(*a, **k):
        acc = accelerator(*a, **k); acc.scaler, acc.native_amp = torch.amp.GradScaler('cpu'), True
        return acc
    monkeypatch.setattr(T, 'fresh_accelerator', with_loss_scaling)

def test_fp16_goes_on_past_a_few_overflowing_steps(model, data, tmp_path, monkeypatch, fp16_with_loss_scaling):
    "In fp16 a step whose loss overflows is skipped by the loss scaler, the LoRA untouched: four in a row are no reason to stop (five are)"
    loss, calls = T.denoising_loss, []
    def overflowing(*a, **k):
        out = loss(*a, **k)
        if torch.is_grad_enabled(): calls.append(1)
        return (out[0] * float('inf'), *out[1:]) if 2 <= len(calls) <= 1 + T.FP16_OVERFLOWS - 1 else out
    monkeypatch.setattr(T, 'denoising_loss', overflowing)
    out = run(model, data, tmp_path, max_train_steps=9, mixed_precision='fp16')
    ls = col(out, 'loss')
    assert [math.isfinite(l) for l in ls] == [True] + [False] * (T.FP16_OVERFLOWS - 1) + [True] * 4 and manifest(out)['steps'] == 9

def test_fp16_that_skips_every_step_stops_the_run(model, data, tmp_path, monkeypatch, fp16_with_loss_scaling):
    "fp16 whose gradients overflow at every step (the loss scaler skips each, so nothing is learnt; seen on an H200): the run stops, saying to use bf16 or fp32"
    loss = T.denoising_loss
    monkeypatch.setattr(T, 'denoising_loss', lambda *a, **k: (lambda out: (InfiniteGradient.apply(out[0]), *out[1:]) if torch.is_grad_enabled() else out)(loss(*a, **k)))
    with pytest.raises(T.TrainingError, match=f"fp16 training is not learning: the loss scaler skipped the last {T.FP16_SKIPS} steps \\(from step 1\\).* mixed_precision bf16"):
        T.train(spec(model, data, training_args=dict(max_train_steps=40, mixed_precision='fp16')), tmp_path/'run', progress=False)
    assert len(rows(tmp_path/'run')) == T.FP16_SKIPS and all(math.isfinite(l) for l in col(tmp_path/'run', 'loss'))  # the losses were fine: the gradients were not

def lora_delta(out):
    "Every LoRA's weight change (up @ down), flattened into one vector"
    from safetensors.torch import load_file
    w = load_file(out/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors')
    return torch.cat([(w[m + '.lora.up.weight'] @ w[m + '.lora.down.weight']).ravel() for m in sorted({k.rsplit('.lora', 1)[0] for k in w})])

def held_out_loss(model, images, results=None):
    "The denoising loss on images the run did not train on, over 16 fixed draws of noise and timestep"
    pipe = tiny_pipe(model)
    if results: load_results(pipe, results)
    pix = torch.stack(T.load_pixels(images, 64)[0])
    with torch.no_grad():
        latents = pipe.vae.encode(pix).latent_dist.mean * pipe.vae.config.scaling_factor
        emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, ['a photo of sks robot'], 'cpu', torch.float32).expand(len(pix), -1, -1)
        sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
        return float(np.mean([T.denoising_loss(pipe.unet, sched, latents, emb, torch.Generator().manual_seed(k))[0].item() for k in range(16)]))

def test_bf16_trains_to_the_same_outcome_as_fp32(model, tmp_path, monkeypatch):
    "Half precision keeps what a run learns: the held-out loss it reaches and the LoRA it ends with (a run that learns nothing fails this)"
    from cerebrium_ft import speed
    monkeypatch.setattr(speed, 'cpu_has_bf16', lambda: True)  # bf16 on every CPU (emulated without AVX512-BF16/AMX)
    make_subject_images(tmp_path/'all', n=8, size=64)
    photos = sorted((tmp_path/'all').glob('*.jpg'))
    (tmp_path/'train').mkdir()
    for p in photos[:6]: p.rename(tmp_path/'train'/p.name)
    held = photos[6:]
    runs = {p: run(model, tmp_path/'train', tmp_path, p, max_train_steps=30, learning_rate=1e-2, mixed_precision=p) for p in ('no', 'bf16')}
    assert manifest(runs['bf16'])['precision'] == 'bf16'
    base, fp32, bf16 = held_out_loss(model, held), held_out_loss(model, held, runs['no']), held_out_loss(model, held, runs['bf16'])
    assert fp32 < 0.9 * base, (base, fp32)                         # the fp32 run learned
    assert base - bf16 > 0.9 * (base - fp32), (base, fp32, bf16)   # and bf16 learned as much
    a, b = lora_delta(runs['no']), lora_delta(runs['bf16'])
    cos = torch.nn.functional.cosine_similarity(a, b, 0).item()
    assert cos > 0.95 and 0.9 < (b.norm() / a.norm()).item() < 1.1, (cos, (b.norm() / a.norm()).item())

def test_rank(model, data, tmp_path):
    from safetensors.torch import load_file
    out = run(model, data, tmp_path, rank=8, max_train_steps=1)
    w = load_file(out/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors')
    assert {v.shape[0] for k, v in w.items() if k.endswith('lora.down.weight')} == {8}

# --- errors before any model is loaded ---------------------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    def boom(*a, **k): raise AssertionError('a model was loaded')
    monkeypatch.setattr(T, 'load_models', boom); monkeypatch.setattr(T, 'class_images', boom)

def test_no_images(model, tmp_path, no_loading):
    (tmp_path/'empty').mkdir()
    with pytest.raises(T.TrainingError, match='no usable images'): T.train(spec(model, tmp_path/'empty'), tmp_path/'o')
    assert not (tmp_path/'o').exists()

def test_unreadable_model_path(data, tmp_path, no_loading):
    with pytest.raises(T.TrainingError, match='does not exist'): T.train(spec(str(tmp_path/'nope'), data), tmp_path/'o')
    (tmp_path/'junk').mkdir()
    with pytest.raises(T.TrainingError, match='no model_index.json'): T.train(spec(str(tmp_path/'junk'), data), tmp_path/'o')

def test_a_family_that_does_not_train_is_refused_before_loading(data, tmp_path, no_loading):
    for cls, said in [('WanPipeline', 'is a WanPipeline (a video model), which cerebrium-ft does not train; it trains Stable Diffusion 1.x, Stable Diffusion 2.x, Stable Diffusion XL, FLUX.1, Stable Diffusion 3.5'),
                      ('PixArtAlphaPipeline', 'is a PixArtAlphaPipeline, which cerebrium-ft does not train')]:
        m = tmp_path/cls; m.mkdir(); (m/'model_index.json').write_text(json.dumps({'_class_name': cls}))
        with pytest.raises(T.TrainingError, match=re.escape(said)): T.train(spec(str(m), data), tmp_path/'o')
    assert not (tmp_path/'o').exists()

def test_class_prompt_without_number(model, data, no_loading):
    with pytest.raises(SettingsError, match='add --num-prior-class-images'): spec(model, data, prior_class_prompt='a photo of a robot')

# --- Stable Diffusion 2.x: the OpenCLIP text encoder, v-prediction ------------------------------------------

def test_sd2_v_prediction_trains_towards_the_velocity_and_its_results_load(data, tmp_path, monkeypatch):
    "A tiny SD 2.x 768-v-shaped model: recognised as sd2, trained on the velocity target, its loss lowered, its results loaded as they were trained"
    model = str(build_tiny_pipeline(tmp_path/'sd2', family='sd2-v'))
    kinds, loss = [], T.denoising_loss  # the loss gets a v-prediction scheduler (the notebook tests that it then targets the velocity)
    monkeypatch.setattr(T, 'denoising_loss', lambda unet, sched, *a, **k: (torch.is_grad_enabled() and kinds.append(sched.config.prediction_type)) or loss(unet, sched, *a, **k))
    out = T.train(spec(model, data, training_args=dict(max_train_steps=40, learning_rate=1e-2, num_validation_images=1, validation_epochs=10, mixed_precision='no')), tmp_path/'run', progress=False)
    assert set(kinds) == {'v_prediction'} and len(kinds) == 40
    monkeypatch.setattr(T, 'denoising_loss', loss)
    m = manifest(out)
    assert (m['base_model']['family'], m['base_model']['prediction']) == ('sd2', 'v_prediction')
    from safetensors import safe_open
    with safe_open(str(out/'lora_kohya.safetensors'), 'pt') as f: meta = f.metadata()
    assert (meta['ss_base_model_version'], meta['ss_v2'], meta['ss_v_parameterization']) == ('sd_v2', 'True', 'True')
    pipe = tiny_pipe(model)
    pix = torch.stack(T.load_pixels(sorted(data.glob("*.jpg")), 64)[0])
    with torch.no_grad():
        latents = pipe.vae.encode(pix).latent_dist.mean * pipe.vae.config.scaling_factor
        emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, ['a photo of sks robot'], 'cpu', torch.float32).expand(len(pix), -1, -1)
        from diffusers import DDPMScheduler
        sched = DDPMScheduler.from_config(pipe.scheduler.config)  # the trainer's noise scheduler
        assert sched.config.prediction_type == 'v_prediction'
        def loss(): return T.denoising_loss(pipe.unet, sched, latents, emb, torch.Generator().manual_seed(123))[0].item()
        base = loss(); load_results(pipe, out); tuned = loss()
    assert tuned < base * 0.9, (base, tuned)  # the velocity loss, the one it trained on, went down
    loaded = load_pipeline(out, device='cpu')
    assert loaded.scheduler.config.prediction_type == 'v_prediction' and loaded.get_active_adapters()
    assert loaded('a photo of sks robot', num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0].size == (64, 64)
    kohya = tiny_pipe(model); kohya.scheduler = loaded.scheduler.__class__.from_config(loaded.scheduler.config)
    kohya.load_lora_weights(str(out), weight_name='lora_kohya.safetensors')
    assert np.abs(render(loaded) - render(kohya)).max() <= 1.0  # the kohya file loads back to the same model

# --- SDXL: two text encoders, pooled embeddings, size and crop conditioning ----------------------------------

def loss_before_and_after(model, key, data, out, seeds):
    "The family's denoising loss on the instance images (the mean over `seeds` noise draws): of the base model, then with the run's LoRA loaded"
    from cerebrium_ft.families import FAMILIES, denoiser_of, encode_text, load_parts
    family = FAMILIES[key]; parts = load_parts(model, 'main', family); net = denoiser_of(family, parts)
    pix, vae = torch.stack(T.load_pixels(sorted(data.glob("*.jpg")), 64)[0]), parts['vae']
    with torch.no_grad():
        scaling, shift = family.latent_scaling(vae, 'cpu')
        latents = (family.latent_dist(vae, pix)[0] - shift) * scaling  # as the family encodes: Qwen-Image's VAE takes a one-frame video, its channels normalised apart
        cond = {k: v.expand(len(pix), *v.shape[1:]) for k, v in encode_text(family, parts, ['a photo of sks robot'], 'cpu', torch.float32, resolution=64).items()}
        loss = lambda: np.mean([T.denoising_loss(net, parts['noise_scheduler'], latents, cond, torch.Generator().manual_seed(k), family=family)[0].item()
                                for k in range(seeds)])
        base = loss()
        net.load_lora_adapter(str(out/'checkpoints/final/attn_procs'), weight_name='pytorch_lora_weights.safetensors', prefix=family.denoiser)
        return base, loss()

def loads_as_trained(out, model, pipeline_cls):
    "`load_pipeline` gives the family's pipeline with the LoRA, which changes what it draws; the kohya file, through diffusers' converter, draws the same"
    pipe = load_pipeline(out, device='cpu')
    assert type(pipe) is pipeline_cls and pipe.get_active_adapters()
    render = lambda p: np.asarray(p('a photo of sks robot', num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0], dtype=float)
    kohya = pipeline_cls.from_pretrained(model); kohya.set_progress_bar_config(disable=True)
    kohya.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    assert np.abs(render(pipe) - render(kohya)).mean() > 1.0
    kohya.load_lora_weights(str(out), weight_name='lora_kohya.safetensors')
    assert np.abs(render(pipe) - render(kohya)).max() <= 1.0

@pytest.mark.parametrize('key, pipeline, prediction, kohya_name, lr, seeds', [
    ('sdxl', 'StableDiffusionXLPipeline', 'epsilon', 'sdxl_base_v1-0', 2e-2, 4),
    ('flux', 'FluxPipeline', 'flow_matching', 'flux1', 1e-2, 8)])
def test_sdxl_and_flux_train_with_prior_preservation_and_load_in_their_pipelines(data, tmp_path, key, pipeline, prediction, kohya_name, lr, seeds):
    "Tiny SDXL- and FLUX.1-shaped models: class images from their own pipelines, their loss lowered, results and kohya file loaded in their pipelines"
    import diffusers
    from safetensors import safe_open
    from cerebrium_ft.families import FAMILIES
    family, model = FAMILIES[key], str(build_tiny_pipeline(tmp_path/key, family=key))
    out = T.train(spec(model, data, prior_class_prompt='a photo of a robot', num_prior_class_images=2,
                       training_args=dict(max_train_steps=60, learning_rate=lr, num_validation_images=1, validation_epochs=10, mixed_precision='no')),
                  tmp_path/'run', cache=tmp_path/'cache', progress=False)
    m = manifest(out)
    assert (m['base_model']['family'], m['base_model']['prediction'], m['class_images']) == (key, prediction, 2)
    assert m['lora']['targets'] == list(family.lora_targets) and (out/'validation/epoch_0010/00.png').is_file()
    assert all(float(r['prior_loss']) > 0 for r in rows(out))
    with safe_open(str(out/'lora_kohya.safetensors'), 'pt') as f:
        assert f.metadata()['ss_base_model_version'] == kohya_name and all(k.startswith(f'lora_{family.denoiser}_') for k in f.keys())
        assert key != 'flux' or any('transformer_blocks_0_attn_add_q_proj' in k for k in f.keys())  # FLUX.1's text stream has its LoRA too
    base, tuned = loss_before_and_after(model, key, data, out, seeds)
    assert tuned < base * 0.95, (base, tuned)  # SDXL: 0.92 measured; like SDXL, the tiny UNet has no attention in its first block, so an attention LoRA moves it less
    loads_as_trained(out, model, getattr(diffusers, pipeline))

@pytest.mark.parametrize('family', ['sdxl', 'flux'])
def test_sdxl_and_flux_train_in_bf16_as_a_cpu_with_amx_picks(data, tmp_path, family, monkeypatch):
    "The SDXL and FLUX.1 steps under bf16 autocast (what 'auto' picks on AMX CPUs; forced here, so CPUs without it run the same path), with gradient checkpointing: they train and record it"
    from cerebrium_ft import speed
    monkeypatch.setattr(speed, 'cpu_has_bf16', lambda: True)  # bf16 on every CPU (emulated without AVX512-BF16/AMX): asking for it is not enough there
    model = str(build_tiny_pipeline(tmp_path/family, family=family))
    out = T.train(spec(model, data, training_args=dict(max_train_steps=4, mixed_precision='bf16', num_validation_images=1, gradient_checkpointing=True)),
                  tmp_path/'run', progress=False)
    m = manifest(out)
    assert (m['precision'], m['base_model']['family'], m['steps']) == ('bf16', family, 4)
    assert all(math.isfinite(l) for l in col(out, 'loss'))

def test_the_backward_pass_recomputes_attention_under_the_kernels_of_the_forward(model, data, tmp_path, monkeypatch):
    """With gradient checkpointing the backward pass runs the denoiser's forward again: it must do so under the same choice of attention
    kernels (`training_attention`, which on CUDA leaves out cuDNN's), or the recomputed tensors differ from the saved ones (CheckpointError,
    seen on an H200). A marker stands in for the kernel choice on this CPU: every attention that builds a graph runs inside it"""
    import contextlib, torch.nn.functional as F
    inside, calls, sdpa = [False], [], F.scaled_dot_product_attention
    @contextlib.contextmanager
    def marked(device):
        inside[0] = True
        try: yield
        finally: inside[0] = False
    def recorded(*a, **k):
        if torch.is_grad_enabled(): calls.append((inside[0], torch._C._current_graph_task_id() != -1))  # (under the choice, in a backward pass)
        return sdpa(*a, **k)
    monkeypatch.setattr(T, 'training_attention', marked)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', recorded)
    run(model, data, tmp_path, max_train_steps=2, mixed_precision='no', gradient_checkpointing=True, num_validation_images=0)
    assert any(backward for _, backward in calls), calls  # the recomputation ran
    assert all(chosen for chosen, _ in calls), calls

# --- where the LoRA goes (lora_layers), and LoRA+ -------------------------------------------------------------

@pytest.mark.parametrize('key', ['sd1', 'sdxl', 'flux'])
def test_transformer_layers_put_the_lora_on_every_linear_layer_of_the_blocks_in_each_family(data, tmp_path, key):
    """lora_layers 'transformer' with train_text_encoder: a LoRA on the blocks' attention, feed-forward (and the UNet's in and out projections) and on the CLIP
    encoders' MLPs; the results load, and the kohya file loads through diffusers' converters to the same model (FLUX.1's: its keys name every layer trained,
    as ComfyUI's map of FLUX.1 reads them; diffusers' converter of that layout knows attention layers only)"""
    import diffusers
    from safetensors.torch import load_file
    from cerebrium_ft.families import FAMILIES, TEXT_BLOCK_TARGETS
    family, model = FAMILIES[key], str(build_tiny_pipeline(tmp_path/key, family=key))
    out = T.train(spec(model, data, training_args=dict(max_train_steps=6, learning_rate=1e-2, lora_layers='transformer', train_text_encoder=True, mixed_precision='no')),
                  tmp_path/'run', progress=False)
    lora = manifest(out)['lora']
    assert lora['targets'] == list(family.block_targets) and lora['text_encoder_targets'] == list(TEXT_BLOCK_TARGETS)
    keys = load_file(out/lora['weights']).keys()
    for layer in ('ff.net.0.proj', 'ff.net.2', *(('ff_context.net.0.proj', 'ff_context.net.2') if key == 'flux' else ('proj_in', 'proj_out')), 'mlp.fc1', 'mlp.fc2'):
        assert any(f'.{layer}.lora' in k for k in keys), layer
    if key != 'flux': return loads_as_trained(out, model, getattr(diffusers, family.pipeline))
    assert type(load_pipeline(out, device='cpu')) is diffusers.FluxPipeline
    trained = {k.split('.', 1)[1].rsplit('.lora', 1)[0] for k in keys if k.startswith('transformer.')}
    named = {k.split('.')[0] for k in load_file(out/'lora_kohya.safetensors') if k.startswith('lora_transformer_')}
    assert named == {'lora_transformer_' + m.replace('.', '_') for m in trained} and any('ff_context_net_2' in k for k in named)
    with pytest.raises(KeyError):  # diffusers' converter of FLUX.1's kohya layout knows attention layers only: that file is ComfyUI's (as the README says)
        diffusers.FluxPipeline.from_pretrained(model).load_lora_weights(str(out), weight_name='lora_kohya.safetensors')
    from conftest import run_cli  # while load_results, load_pipeline (above) and generate read the diffusers file
    r = run_cli('generate', out, 'a photo of sks robot', '-n', 1, '--steps', 2, '--output', tmp_path/'g.png', '--device', 'cpu')
    assert r.returncode == 0 and (tmp_path/'g.png').exists(), r.stderr

def test_lora_layers_by_name(model, data, tmp_path, no_loading):
    "Module names put the LoRA on those layers alone; a name the denoiser has no layer for is refused from its config, before any model loads"
    with pytest.raises(T.TrainingError, match=r"lora_layers names 'attn3': no linear or convolution layer of .*'s unet is called so; name some of to_q, .*ff\.net\.0\.proj"):
        T.train(spec(model, data, training_args=dict(lora_layers='to_q,attn3')), tmp_path/'o')
    assert not (tmp_path/'o').exists()

def test_lora_layers_by_name_train_those_layers(model, data, tmp_path):
    from safetensors.torch import load_file
    out = run(model, data, tmp_path, lora_layers='to_v, ff.net.2', max_train_steps=1, mixed_precision='no')
    assert manifest(out)['lora']['targets'] == ['to_v', 'ff.net.2']
    assert {k.split('.lora')[0].rsplit('.', 1)[-1] for k in load_file(out/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors')} == {'to_v', '2'}

def test_loraplus_lr_ratio_moves_the_up_matrices_that_many_times_as_fast(model, data, tmp_path):
    "LoRA+ at 16: in the same steps each LoRA's up matrix (zero at the start) goes 16 times as far, the denoiser's and the text encoder's; the rate logged is the base one"
    from safetensors.torch import load_file
    def ups(out):
        w = load_file(out/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors')
        norm = lambda part: torch.cat([v.ravel() for k, v in w.items() if k.startswith(part) and ('lora.up' in k or 'lora_B' in k or 'up.weight' in k)]).norm().item()
        return norm('unet.'), norm('text_encoder.')
    runs = {r: run(model, data, tmp_path, f"ratio{r}", max_train_steps=3, learning_rate=1e-4, use_8bit_adam=False, train_text_encoder=True, mixed_precision='no',
                   **({'loraplus_lr_ratio': r} if r else {})) for r in (None, 16)}
    (unet, text), (unet16, text16) = ups(runs[None]), ups(runs[16])
    assert 14 < unet16 / unet < 18 and 14 < text16 / text < 18, (unet16 / unet, text16 / text)  # AdamW's steps are about the rate in size, whatever the gradient
    assert col(runs[16], 'lr') == [1e-4] * 3 and 'LoRA+: the LoRAs\' up matrices learn at 16 times' in (runs[16]/'logs.txt').read_text()

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    "Six photos of the robot: two portrait (60x96), two landscape (96x60), two square; and a folder of two square class images"
    from PIL import Image
    d = tmp_path_factory.mktemp('shapes')
    for k, p in enumerate(make_subject_images(d/'src', n=6, size=96)):
        with Image.open(p) as im: (im.crop((18, 0, 78, 96)) if k < 2 else im.crop((0, 18, 96, 78)) if k < 4 else im.copy()).save(d/p.name)
    make_subject_images(d/'class', n=2, size=64, seed=1)
    import shutil; shutil.rmtree(d/'src')
    return d

@pytest.mark.parametrize('family, precision', [('sdxl', 'no'), ('flux', 'no'), ('sdxl', 'bf16'), ('flux', 'bf16')])
def test_aspect_ratio_buckets_train_each_image_at_its_own_shape(shapes, tmp_path, family, precision, monkeypatch):
    "With enable_bucket, portrait and landscape photos train uncropped at their buckets' shapes (48x80, 80x48), square class images beside them at 64x64; SDXL is conditioned on each image's real size and crop; the results load. In fp32 and in bf16 (what 'auto' picks on AMX CPUs; forced here on every CPU)"
    import diffusers
    from cerebrium_ft import speed
    monkeypatch.setattr(speed, 'cpu_has_bf16', lambda: True)  # bf16 asked for is bf16 trained, whichever CPU runs the test
    seen, predict = [], T.predict
    def spy(fam, net, noisy, t, cond):
        if torch.is_grad_enabled(): seen.append((tuple(noisy.shape[2:]), cond.get('time_ids')))
        return predict(fam, net, noisy, t, cond)
    monkeypatch.setattr(T, 'predict', spy)
    model = str(build_tiny_pipeline(tmp_path/family, family=family))
    out = T.train(spec(model, shapes, prior_class_prompt='a photo of a robot', prior_class_image_dir=str(shapes/'class'),
                       training_args=dict(max_train_steps=6, learning_rate=2e-2, train_batch_size=2, enable_bucket=True, bucket_reso_steps=16, num_validation_images=1,
                                          validation_epochs=3, mixed_precision=precision)), tmp_path/'run', progress=False)
    assert manifest(out)['precision'] == precision and all(math.isfinite(l) for l in col(out, 'loss'))
    assert "aspect-ratio buckets (enable_bucket), with the training images in each: 48x80 (2), 80x48 (2), 64x64 (2)" in (out/'logs.txt').read_text()
    assert {s for s, _ in seen} == {(10, 6), (6, 10), (8, 8)}  # latents of 48x80, 80x48 and 64x64 images: none cropped square
    if family == 'sdxl':
        ids = {tuple(int(v) for v in row) for _, t in seen for row in t}
        # original size, crop corner (the portrait's 60 px scaled to 50, centred in 48: one column off), bucket, heights first; the class images' own
        assert ids == {(96, 60, 0, 1, 80, 48), (60, 96, 1, 0, 48, 80), (96, 96, 0, 0, 64, 64), (64, 64, 0, 0, 64, 64)}, ids
    loads_as_trained(out, model, getattr(diffusers, 'StableDiffusionXLPipeline' if family == 'sdxl' else 'FluxPipeline'))

def test_a_bucketed_run_stopped_after_a_checkpoint_resumes_as_if_never_stopped(model, shapes, tmp_path, monkeypatch):
    "Buckets, mirror images, random crops and prior preservation: a run stopped after its checkpoint at step 3 ends with the losses and weights of one never stopped"
    s = spec(model, shapes, prior_class_prompt='a photo of a robot', prior_class_image_dir=str(shapes/'class'),
             training_args=dict(max_train_steps=8, checkpointing_steps=3, enable_bucket=True, bucket_reso_steps=16, random_flip=True, center_crop=False, mixed_precision='no'))
    resumes_as_if_never_stopped(s, tmp_path, monkeypatch)

def resumes_as_if_never_stopped(s, tmp_path, monkeypatch):
    "Run `s` whole, and again stopped after its first checkpoint (at step 3) then started again: the same losses, step by step, and the same LoRA weights"
    from safetensors.torch import load_file
    whole = T.train(s, tmp_path/'whole', progress=False)
    save = T.Training.checkpoint
    def stop(self):
        save(self)
        raise KeyboardInterrupt('stopped after its first checkpoint')
    with monkeypatch.context() as m:
        m.setattr(T.Training, 'checkpoint', stop)
        with pytest.raises(KeyboardInterrupt): T.train(s, tmp_path/'stopped', progress=False)
    assert len(rows(tmp_path/'stopped')) == 3
    out = T.train(s, tmp_path/'stopped', progress=False)
    assert 'resuming from step_000003' in (out/'logs.txt').read_text()
    assert [(r['step'], r['loss']) for r in rows(out)] == [(r['step'], r['loss']) for r in rows(whole)]
    a, b = (load_file(d/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors') for d in (out, whole))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6

def test_a_quantized_base_is_refused_off_cuda_before_anything_is_written(model, data, tmp_path):
    "QLoRA (bitsandbytes' nf4 or 8-bit denoiser) trains on CUDA only: elsewhere the run stops at once, saying what to set"
    for q in ('nf4', '8bit'):
        with pytest.raises(T.TrainingError, match=f"base_quantization {q} runs on CUDA GPUs only .* this run is on cpu: set base_quantization none"):
            T.train(spec(model, data, training_args=dict(base_quantization=q)), tmp_path/'o', device='cpu')
    assert not (tmp_path/'o').exists()

def test_a_run_without_a_resolution_trains_at_its_models_own(model, data, tmp_path):
    "At the default settings a user gets, the resolution is the model's own (the tiny model's 64 px here, 1024 for SDXL and FLUX.1): the log says it, the manifest records it, validation draws at it"
    s = JobSpec(name='robot', hf_model_path=model, dataset=str(data), training_prompt='a photo of sks robot',
                training_args=dict(max_train_steps=2, num_validation_images=1, mixed_precision='no'))
    assert s.training_args.resolution is None
    out = T.train(s, tmp_path/'run', progress=False)
    from PIL import Image
    assert manifest(out)['resolution'] == 64 and Image.open(out/'validation/epoch_0001/00.png').size == (64, 64)
    assert f"resolution 64 px: the one {model} was made for" in (out/'logs.txt').read_text()

def test_min_snr_and_noise_offset_change_the_loss_and_flux_refuses_snr_gamma(model, data, tmp_path):
    "snr_gamma (kohya's min_snr_gamma) and noise_offset reach the step: the same seed gives other losses; FLUX.1 (flow matching) refuses snr_gamma before anything loads"
    ta = dict(max_train_steps=3, num_validation_images=0, mixed_precision='no')
    plain = col(T.train(spec(model, data, training_args=ta), tmp_path/'plain', progress=False), 'loss')
    snr = col(T.train(spec(model, data, training_args=dict(ta, min_snr_gamma=1.0)), tmp_path/'snr', progress=False), 'loss')
    offset = col(T.train(spec(model, data, training_args=dict(ta, noise_offset=0.1)), tmp_path/'offset', progress=False), 'loss')
    assert snr[0] < plain[0], (snr, plain)  # the first step, from the same weights and draws: gamma 1 makes every weight min(SNR, 1)/SNR <= 1
    assert offset != plain
    flux = str(build_tiny_pipeline(tmp_path/'flux', family='flux'))
    with pytest.raises(T.TrainingError, match='trained by flow matching: leave snr_gamma unset'):
        T.train(spec(flux, data, training_args=dict(snr_gamma=5.0)), tmp_path/'o')
    with pytest.raises(T.TrainingError, match=r'bucket_reso_steps must be a multiple of 16 for FLUX.1 \(its latents are packed in 2x2 patches\); got 24, try 16'):
        T.train(spec(flux, data, training_args=dict(enable_bucket=True, bucket_reso_steps=24)), tmp_path/'o')
    assert not (tmp_path/'o').exists()

def test_captions_beside_the_images_are_what_the_text_encoder_encodes(model, data, tmp_path, monkeypatch):
    "A .txt beside an image is its caption: encoded as that image's prompt; an image without one trains on the training prompt"
    import shutil
    d = tmp_path/'captioned'; shutil.copytree(data, d)
    (d/'robot_00.txt').write_text('a photo of sks robot on a red sofa\n')
    seen, encode = [], T.encode_text
    monkeypatch.setattr(T, 'encode_text', lambda family, m, prompts, *a, **k: seen.append(list(prompts)) or encode(family, m, prompts, *a, **k))
    out = T.train(spec(model, d, training_args=dict(max_train_steps=1, num_validation_images=0, mixed_precision='no')), tmp_path/'run', progress=False)
    assert seen[0][:2] == ['a photo of sks robot', 'a photo of sks robot on a red sofa']  # the two prompts, sorted, then validation's
    assert 'captions: 1 of 6 images have their own; the others train on the training prompt' in (out/'logs.txt').read_text()

def test_trigger_word_and_caption_dropout(model, data, tmp_path, monkeypatch):
    "{trigger} in a caption becomes the trigger word and a caption without it gets it in front; caption_dropout_rate 1 trains every instance example on the empty prompt, 0.3 about 30% of them"
    import shutil
    d = tmp_path/'captioned'; shutil.copytree(data, d)
    (d/'robot_00.txt').write_text('a photo of {trigger} robot on a sofa'); (d/'robot_01.txt').write_text('a robot in the snow')
    with pytest.raises(T.TrainingError, match=r"the caption of robot_00.jpg has a trigger placeholder .* add trigger_word"):
        T.train(spec(model, d), tmp_path/'refused')
    assert not (tmp_path/'refused').exists()
    encoded, batches, encode, loss = [], [], T.encode_text, T.denoising_loss
    monkeypatch.setattr(T, 'encode_text', lambda family, m, prompts, *a, **k: encoded.append((list(prompts), encode(family, m, prompts, *a, **k))) or encoded[-1][1])
    monkeypatch.setattr(T, 'denoising_loss', lambda net, sched, latents, cond, *a, **k: (torch.is_grad_enabled() and batches.append(cond['embeds'])) or loss(net, sched, latents, cond, *a, **k))
    T.train(spec(model, d, training_args=dict(max_train_steps=3, num_validation_images=0, mixed_precision='no', trigger_word='sks', caption_dropout_rate=1.0)),
            tmp_path/'run', progress=False)
    prompts, cond = encoded[0]
    assert {'a photo of sks robot on a sofa', 'sks, a robot in the snow', 'a photo of sks robot', ''} <= set(prompts)
    empty = cond['embeds'][prompts.index('')]
    assert len(batches) == 3 and all(torch.equal(row, empty) for b in batches for row in b)  # every example on the empty prompt
    encoded.clear(); batches.clear()
    T.train(spec(model, d, training_args=dict(max_train_steps=30, num_validation_images=0, mixed_precision='no', trigger_word='sks', caption_dropout_rate=0.3)),
            tmp_path/'run30', progress=False)
    prompts, cond = encoded[0]
    empty = cond['embeds'][prompts.index('')]
    dropped = [torch.equal(row, empty) for b in batches for row in b]
    assert len(dropped) == 60 and 0.15 <= sum(dropped) / 60 <= 0.45, sum(dropped)  # about that fraction of the 60 examples, not all, not none

def test_the_best_checkpoint_is_the_lowest_held_out_score_and_generate_uses_it(model, tmp_path):
    "Two images held out of training score a LoRA kept at every epoch; checkpoints_total_limit keeps the newest two and the best; `generate --use best` draws with the best"
    from PIL import Image
    from conftest import run_cli
    data = tmp_path/'robot8'; make_subject_images(data, n=8, size=64)
    out = tmp_path/'run'
    ta = dict(resolution=64, learning_rate=0.2, holdout_images=2, validation_epochs=1, num_train_epochs=8, num_validation_images=0, mixed_precision='no',
              checkpoints_total_limit=2)
    r = run_cli('train', 'robot', model, data, 'a photo of sks robot', '--output', out, '--training-args', json.dumps(ta))
    assert r.returncode == 0, r.stderr
    m = manifest(out)
    assert len(m['heldout']['images']) == 2 and len(m['instance_images']) == 6 and not set(m['heldout']['images']) & set(m['instance_images'])
    logs = (out/'logs.txt').read_text()
    assert 'held out of training to score checkpoints on' in logs and ('best checkpoint: step_' in logs or 'the final checkpoint scored best' in logs)
    scores = {int(r['step']): float(r['score']) for r in rows(out) if r['score']}
    assert sorted(scores) == list(range(3, 25, 3)) == [c['step'] for c in m['checkpoints']]  # 6 images, batch 2: one scored checkpoint per 3-step epoch
    best = min(scores, key=scores.get)
    assert m['best']['step'] == best and m['best']['checkpoint'] == ('final' if best == 24 else f"step_{best:06d}")
    kept = [c['step'] for c in m['checkpoints'] if c['weights'] and c['name'] != 'final']
    assert kept == sorted({18, 21} | ({best} - {24}))  # the newest two, and the best wherever it is
    assert all((out/c['weights']).is_file() == bool(c['weights']) for c in m['checkpoints'] if c['weights'])
    r = run_cli('generate', out, 'a photo of sks robot', '-n', '1', '--steps', '2', '--use', 'best', '--output', tmp_path/'best.png', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    pipe = load_pipeline(out, device='cpu', use=best)
    want = np.asarray(pipe(['a photo of sks robot'], num_inference_steps=2, guidance_scale=7.5, generator=[torch.Generator('cpu').manual_seed(42)]).images[0], dtype=float)
    assert np.abs(np.asarray(Image.open(tmp_path/'best.png'), dtype=float) - want).max() <= 1.0  # the best checkpoint's LoRA drew it
    r = run_cli('generate', out, 'a photo of sks robot', '--use', '5', '--output', tmp_path/'x.png', '--device', 'cpu')
    assert r.returncode != 0 and "keep no checkpoint '5'" in r.stderr and not (tmp_path/'x.png').exists()

@pytest.mark.parametrize('family', ['sd1', 'flux'])
def test_validation_with_several_prompts_a_negative_prompt_guidance_and_steps(data, tmp_path, family, monkeypatch):
    "Each validation prompt gets its row of images, each PNG says what made it, the negative prompt is encoded (not for FLUX.1 [dev]), guidance and steps reach the pipeline"
    from PIL import Image
    model = str(build_tiny_pipeline(tmp_path/family, family=family))
    calls, encoded, assemble, encode = [], [], T.assemble_pipeline, T.encode_text
    class Spy:
        def __init__(self, pipe): self.pipe = pipe
        def __getattr__(self, k): return getattr(self.pipe, k)
        def __call__(self, **kw): calls.append(kw); return self.pipe(**kw)
    monkeypatch.setattr(T, 'assemble_pipeline', lambda *a, **k: Spy(assemble(*a, **k)))
    monkeypatch.setattr(T, 'encode_text', lambda fam, m, prompts, *a, **k: encoded.extend(prompts) or encode(fam, m, prompts, *a, **k))
    prompts = ['a photo of sks robot on the moon', 'sks robot as a watercolor']
    out = T.train(spec(model, data, training_args=dict(max_train_steps=3, mixed_precision='no', num_validation_images=2, validation_prompt=prompts,
                                                      validation_negative_prompt='blurry', validation_guidance_scale=3.0, validation_inference_steps=4)),
                  tmp_path/'run', progress=False)
    assert [(c['num_inference_steps'], c['guidance_scale']) for c in calls] == [(4, 3.0)] * 2  # one call per prompt
    assert encoded[-3:] == prompts + ['blurry']
    assert family == 'flux' or all('negative_prompt_embeds' in c for c in calls)
    ims = [Image.open(p) for p in sorted((out/'validation'/'epoch_0001').glob('0*.png'))]
    assert [(im.text['prompt'], im.text['seed'], im.text['negative_prompt'], im.text['step']) for im in ims] == \
        [(p, str(42 + i), 'blurry', '3') for p in prompts for i in range(2)]
    assert Image.open(out/'validation'/'epoch_0001'/'grid.png').size == (128, 128)  # a row of 2 per prompt
    assert 'grid.png' not in {p.name for p in RunDir(out).validation_images()}

def test_shuffle_caption_trains_on_orders_of_the_tags_keeping_the_first(model, data, tmp_path, monkeypatch):
    "shuffle_caption: each example trains on one of its caption's tag orders, drawn each step; keep_tokens 1 keeps the trigger tag first"
    import shutil
    d = tmp_path/'tagged'; shutil.copytree(data, d)
    caption = 'sks robot, red paint, on a beach, at sunset, smiling'
    for k in range(6): (d/f'robot_{k:02d}.txt').write_text(caption)
    encoded, batches, encode, loss = [], [], T.encode_text, T.denoising_loss
    monkeypatch.setattr(T, 'encode_text', lambda family, m, prompts, *a, **k: encoded.append((list(prompts), encode(family, m, prompts, *a, **k))) or encoded[-1][1])
    monkeypatch.setattr(T, 'denoising_loss', lambda net, sched, latents, cond, *a, **k: (torch.is_grad_enabled() and batches.append(cond['embeds'])) or loss(net, sched, latents, cond, *a, **k))
    T.train(spec(model, d, training_args=dict(max_train_steps=12, num_validation_images=0, mixed_precision='no', shuffle_caption=True, keep_tokens=1)),
            tmp_path/'run', progress=False)
    prompts, cond = encoded[0]
    used = [prompts[next(j for j in range(len(prompts)) if torch.equal(row, cond['embeds'][j]))] for b in batches for row in b]
    assert len(set(used)) >= 4, used  # several orders trained on, not one
    assert all(u.startswith('sks robot, ') and sorted(u.split(', ')) == sorted(caption.split(', ')) for u in used)  # the same tags, the kept one first
    assert 'shuffle_caption: 48 orders of the 6 captions' in (tmp_path/'run'/'logs.txt').read_text()

def test_a_base_model_from_the_hub_downloads_with_its_progress_then_trains(model, data, tmp_path):
    "A Hub id on a slow Hub: the run's progress shows the downloading phase in MB while the files arrive, the log names what came, and the run trains from the local cache"
    import os, subprocess, sys, time
    from cerebrium_ft.testing import FakeHub
    hub = FakeHub().start().serve('me/tiny-sd', model)
    hub.delay = 0.3  # each file late: a download long enough to be watched
    out, phases = tmp_path/'run', set()
    ta = dict(resolution=64, max_train_steps=2, num_validation_images=0, mixed_precision='no')
    env = {**os.environ, **hub.env, 'HF_HOME': str(tmp_path/'hf')}
    train = lambda out: subprocess.Popen([sys.executable, '-m', 'cerebrium_ft.cli', 'train', 'robot', 'me/tiny-sd', str(data), 'a photo of sks robot', '--output', str(out),
                                          '--training-args', json.dumps(ta)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        p = train(out)
        while p.poll() is None:
            try: pr = json.loads((out/'progress.json').read_text()); phases.add((pr['phase'], pr['total']))
            except (OSError, ValueError): pass
            time.sleep(0.05)
        _, err = p.communicate()
        hub.listings_fail, hub.calls[:] = True, []  # the Hub then in trouble: its file list fails (503), its files still come
        again = train(tmp_path/'again'); _, err2 = again.communicate(timeout=600)
    finally: hub.stop()
    assert again.returncode == 0, err2  # trained from the local cache, after saying so
    assert 'cannot read the file list of me/tiny-sd from the Hugging Face Hub (HfHubHTTPError' in err2 and 'loading from what the local Hub cache holds' in err2, err2
    assert not any(c.startswith('GET ') and '/resolve/' in c and c.endswith('.safetensors') for c in hub.calls), hub.calls  # no weights fetched again
    assert p.returncode == 0, err
    mb = sum(f.stat().st_size for f in Path(model).rglob('*') if f.is_file() and f.relative_to(model).parts[0] != '_tokenizer_src') >> 20
    assert ('downloading', mb) in phases and ('training', 2) in phases, phases  # its size in MB, then the steps
    logs = (out/'logs.txt').read_text()
    assert re.search(r'base model me/tiny-sd@main: \d+ files, [\d.]+ MB in the local Hub cache', logs), logs
    assert not any('safety_checker' in c or '_tokenizer_src' in c for c in hub.calls)  # only what training reads
    assert manifest(out)['base_model']['path'] == 'me/tiny-sd'

@pytest.mark.parametrize('family, pipeline, denoiser', [('sd1', 'StableDiffusionPipeline', 'unet'), ('sdxl', 'StableDiffusionXLPipeline', 'unet'), ('flux', 'FluxPipeline', 'transformer')])
def test_train_text_encoder_puts_a_lora_on_each_text_encoder_with_its_own_learning_rate(data, tmp_path, family, pipeline, denoiser, monkeypatch):
    "train_text_encoder: LoRA on the CLIP encoders' attention (SDXL's two; FLUX.1's CLIP, not its T5) at text_encoder_lr, in the results file, each kept checkpoint and the kohya file, which load to the same pipeline"
    import diffusers
    from safetensors.torch import load_file
    model = str(build_tiny_pipeline(tmp_path/family, family=family))
    groups, make = [], T.make_optimizer
    monkeypatch.setattr(T, 'make_optimizer', lambda params, s, lr, device: groups.extend(params) or make(params, s, lr, device))
    out = T.train(spec(model, data, training_args=dict(max_train_steps=12, learning_rate=1e-2, text_encoder_lr=5e-3, train_text_encoder=True, mixed_precision='no',
                                                      num_validation_images=1, validation_epochs=2)), tmp_path/'run', progress=False)
    assert [g['lr'] for g in groups] == [1e-2, 5e-3] and all(p.requires_grad for g in groups for p in g['params'])  # the denoiser's at learning_rate, the text encoders' at theirs
    encs = ['text_encoder'] + (['text_encoder_2'] if family == 'sdxl' else [])
    m = manifest(out)
    assert m['lora']['text_encoders'] == encs and m['lora']['text_encoder_targets'] == ['q_proj', 'k_proj', 'v_proj', 'out_proj']
    for c in m['checkpoints']: assert {k.split('.')[0] for k in load_file(out/c['weights'])} == {denoiser, *encs}, c['name']
    assert 'train_text_encoder: a LoRA on the ' in (out/'logs.txt').read_text()
    cls = getattr(diffusers, pipeline)
    base, tuned = cls.from_pretrained(model), load_pipeline(out, device='cpu')
    ids = base.tokenizer(['a photo of sks robot'], return_tensors='pt').input_ids
    with torch.no_grad(): assert not torch.allclose(base.text_encoder(ids)[0], tuned.text_encoder(ids)[0])  # the loaded text encoder is the trained one
    loads_as_trained(out, model, cls)  # the kohya file (lora_te_, or lora_te1_ and lora_te2_ keys) draws what the results draw

@pytest.mark.parametrize('levers', [{}, dict(lora_layers='transformer', loraplus_lr_ratio=4)])
def test_a_run_with_text_encoder_lora_resumes_exactly(model, data, tmp_path, monkeypatch, levers):
    """The text encoders' LoRA is in the resumable state: a run stopped after step 5 and resumed from step 3 ends as the uninterrupted run;
    also with the LoRA on every layer of the blocks and LoRA+ (an optimizer of four groups, each part's down and up matrices)"""
    from safetensors.torch import load_file
    ta = dict(max_train_steps=9, checkpointing_steps=3, train_text_encoder=True, mixed_precision='no', learning_rate=1e-2, num_validation_images=0, **levers)
    whole = T.train(spec(model, data, training_args=ta), tmp_path/'whole', progress=False)
    real = T.Training.optimizer_step
    def stopped(self, *a):
        real(self, *a)
        if self.step == 5: raise KeyboardInterrupt('stopped')
    monkeypatch.setattr(T.Training, 'optimizer_step', stopped)
    with pytest.raises(KeyboardInterrupt): T.train(spec(model, data, training_args=ta), tmp_path/'cut', progress=False)
    monkeypatch.setattr(T.Training, 'optimizer_step', real)
    cut = T.train(spec(model, data, training_args=ta), tmp_path/'cut', progress=False)
    assert 'resuming from step_000003' in (cut/'logs.txt').read_text()
    a, b = load_file(cut/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors'), load_file(whole/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors')
    assert a.keys() == b.keys() and any(k.startswith('text_encoder.') for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
@pytest.mark.parametrize('layers', [{}, dict(lora_layers='transformer', loraplus_lr_ratio=4)])
def test_train_text_encoder_in_mixed_precision(model, data, tmp_path, monkeypatch, request, precision, layers):
    """train_text_encoder under bf16 (what 'auto' picks on AMX CPUs and most GPUs) and fp16 with loss scaling (GPUs without bf16), forced whatever this CPU is:
    the text LoRA trains in fp32 over weights in the run's precision, the losses stay finite and the LoRA moves; also with the LoRA on every layer of the blocks
    (the UNet's 1x1-convolution proj_in among them, and CLIP's MLPs) and LoRA+"""
    from cerebrium_ft import speed
    from safetensors.torch import load_file
    monkeypatch.setattr(speed, 'cpu_has_bf16', lambda: True)  # bf16 runs (emulated where the CPU has no bf16)
    if precision == 'fp16': request.getfixturevalue('fp16_with_loss_scaling')
    dtypes, setup = {}, T.Training.setup_models
    def recorded(self):
        setup(self)
        enc = self.encoders['text_encoder']
        dtypes.update(lora={p.dtype for p in self.params}, base={p.dtype for m in (enc, self.denoiser) for n, p in m.named_parameters() if 'lora' not in n})
    monkeypatch.setattr(T.Training, 'setup_models', recorded)
    out = run(model, data, tmp_path, precision, max_train_steps=6, learning_rate=1e-2, train_text_encoder=True, mixed_precision=precision, num_validation_images=0, **layers)
    assert manifest(out)['precision'] == precision and all(math.isfinite(l) for l in col(out, 'loss'))
    assert dtypes == dict(lora={torch.float32}, base={getattr(torch, {'bf16': 'bfloat16', 'fp16': 'float16'}[precision])}), dtypes
    w = load_file(out/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors')
    ups = lambda part: [v for k, v in w.items() if k.startswith(part) and ('.up.' in k or '.lora_B.' in k)]
    assert ups('text_encoder.') and any(v.abs().max() > 0 for v in ups('text_encoder.'))  # the text encoder's LoRA left its zero start
    if layers:  # a 1x1 convolution's LoRA and an MLP's, each trained in fp32 under autocast
        moved = ups('unet.down_blocks.0.attentions.0.proj_in') + ups('text_encoder.encoder.layers.0.mlp.fc1')
        assert len(moved) == 2 and all(v.abs().max() > 0 for v in moved), [k for k in w if 'proj_in' in k or 'fc1' in k]
