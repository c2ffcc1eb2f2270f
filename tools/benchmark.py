"""Training speed of cerebrium-ft's trainer: steps/s, whole-job wall time, peak memory, and where a step's time goes.

    .venv/bin/python tools/benchmark.py                      # the tiny pipeline and the SD1.5-proportioned CPU model
    .venv/bin/python tools/benchmark.py --models tiny --steps 30

Each configuration runs in a fresh process, so that its peak memory (RSS; on CUDA also peak allocated) is its own.
The models are built offline by cerebrium_ft.testing: 'tiny' (64 px) and 'sd15-cpu' (SD1.5's proportions scaled down:
UNet 96-192-384-384, 12-layer text encoder of width 192, VAE 32-64-128-128, 256 px). A path to a diffusers folder works too."""
import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path

def _build(name, root):
    from cerebrium_ft.testing import SD15_PROPORTIONED, build_tiny_pipeline
    if Path(name).is_dir(): return Path(name), None
    presets = dict(tiny=({}, 64), **{'sd15-cpu': (SD15_PROPORTIONED, 256)})
    kw, res = presets[name]
    return build_tiny_pipeline(Path(root)/name, **kw), res

def child(args):
    "Run one configuration and print its figures as JSON"
    import torch
    from cerebrium_ft import train as T
    from cerebrium_ft.config import JobSpec
    from cerebrium_ft.testing import make_subject_images
    import logging; logging.getLogger('cerebrium_ft').setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix='cft-bench-'))
    model, res = _build(args.model, root)
    res = args.resolution or res or 512
    make_subject_images(root/'data', n=12, size=res)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    spec = JobSpec('bench', str(model), str(root/'data'), 'a photo of sks robot', training_args=dict(
        resolution=res, train_batch_size=args.batch, max_train_steps=args.steps, num_validation_images=0, checkpointing_steps=10**6))
    # 1. the whole job through train(): load, cache, train, save
    t0 = time.perf_counter()
    T.train(spec, root/'run', device=str(device), progress=False)
    wall = time.perf_counter() - t0
    rows = T.MetricsLog.read(root/'run'/'metrics.csv')
    el = [float(r['elapsed_s']) for r in rows]
    w = min(args.warmup, len(el) - 2)
    steady = (len(el) - 1 - w) / (el[-1] - el[w]) if el[-1] > el[w] else float('nan')
    # 2. where a step's time goes: the same pieces, timed one by one (synchronising, so slower than the real loop)
    parts = breakdown(T, spec, device, args)
    out = dict(model=args.model, device=device.type, resolution=res, batch=args.batch, steps=len(rows), wall_s=round(wall, 2),
               steps_per_s=round(steady, 3), peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               optimizer=json.loads((root/'run'/'manifest.json').read_text())['optimizer'], breakdown_ms=parts)
    if device.type == 'cuda': out['peak_allocated_mb'] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(json.dumps(out))

def breakdown(T, spec, device, args, n=None):
    import torch
    from peft import LoraConfig
    s = spec.training_args
    m = T.load_models(spec.hf_model_path)
    unet = m['unet'].to(device); unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.rank, init_lora_weights='gaussian', target_modules=T.LORA_TARGETS))
    vae, te = m['vae'].to(device), m['text_encoder'].to(device)
    paths = sorted(Path(spec.dataset).glob('*.jpg'))
    mean, std = T.encode_images(vae, T.load_pixels(paths, s.resolution), False, 4, device, torch.float32)
    emb = T.encode_prompts(m['tokenizer'], te, [spec.training_prompt], device, torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = T.make_optimizer(params, s, s.learning_rate, device)
    gen = torch.Generator(device).manual_seed(0)
    sync = (lambda: torch.cuda.synchronize()) if device.type == 'cuda' else (lambda: None)
    times = dict(sample=[], forward=[], backward=[], optimizer=[])
    sched = m['noise_scheduler']
    for i in range(args.warmup + (n or min(args.steps, 10))):
        t = [time.perf_counter()]
        idx = torch.randint(0, len(paths), (args.batch,), generator=gen, device=device)
        latents = T.sample_latents(mean, std, idx, False, gen, vae.config.scaling_factor)
        noise = torch.randn(latents.shape, generator=gen, device=device)
        ts = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen, device=device)
        noisy = sched.add_noise(latents, noise, ts); sync(); t.append(time.perf_counter())
        pred = unet(noisy, ts, emb.expand(args.batch, -1, -1), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise); sync(); t.append(time.perf_counter())
        loss.backward(); sync(); t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm); opt.step(); opt.zero_grad(set_to_none=True); sync(); t.append(time.perf_counter())
        if i >= args.warmup:
            for k, a, b in zip(times, t, t[1:]): times[k].append((b - a) * 1000)
    return {k: round(sum(v) / len(v), 2) for k, v in times.items()}

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', default='tiny,sd15-cpu', help="comma-separated: tiny, sd15-cpu, or diffusers folders")
    ap.add_argument('--steps', type=int, default=40, help="training steps per run")
    ap.add_argument('--warmup', type=int, default=3, help="steps left out of the steady-state rate")
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--resolution', type=int, default=None, help="default: the model's own (64 tiny, 256 sd15-cpu)")
    ap.add_argument('--device', default=None)
    ap.add_argument('--model', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model: return child(args)
    print(f"cerebrium-ft training benchmark: {args.steps} steps, batch {args.batch}, {os.cpu_count()} CPUs")
    head = f"{'model':10} {'device':6} {'px':>4} {'steps/s':>8} {'wall s':>7} {'peak RSS MB':>11}  step breakdown ms (sample / forward / backward / optimizer)"
    print(head); print('-' * len(head))
    for name in args.models.split(','):
        cmd = [sys.executable, __file__, '--model', name, *sum(([f'--{k}', str(v)] for k, v in vars(args).items() if k not in ('models', 'model') and v is not None), [])]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode: print(f"{name}: failed\n{r.stderr[-2000:]}"); continue
        o = json.loads(r.stdout.strip().splitlines()[-1])
        b = o['breakdown_ms']
        print(f"{o['model']:10} {o['device']:6} {o['resolution']:>4} {o['steps_per_s']:>8.2f} {o['wall_s']:>7.1f} {o['peak_rss_mb']:>11}  "
              f"{b['sample']:.1f} / {b['forward']:.1f} / {b['backward']:.1f} / {b['optimizer']:.1f}  ({o['optimizer']}"
              + (f", peak allocated {o['peak_allocated_mb']} MB" if 'peak_allocated_mb' in o else '') + ")")

if __name__ == '__main__': main()
