"""Training speed of cerebrium-ft's trainer: steps/s, whole-job wall time, peak memory, and where a step's time goes.

    .venv/bin/python tools/benchmark.py                      # the tiny pipeline and the SD1.5-proportioned CPU model
    .venv/bin/python tools/benchmark.py --models tiny --steps 30
    .venv/bin/python tools/benchmark.py --models sd15-cpu --prior 20     # with prior preservation: 20 class images generated
    .venv/bin/python tools/benchmark.py --models sdxl-cpu,flux-cpu --steps 10  # SDXL's and FLUX.1's shapes at CPU sizes
    .venv/bin/python tools/benchmark.py --models sd3-cpu,z-image-cpu,qwen-image-cpu,flux2-klein-cpu --steps 10 --no-like-for-like  # the newer families'

Each configuration runs in a fresh process, so that its peak memory (RSS; on CUDA also peak allocated) is its own.
The models are built offline by cerebrium_ft.testing: 'tiny' (64 px), 'sd15-cpu' (SD1.5's proportions scaled down:
UNet 96-192-384-384, 12-layer text encoder of width 192, VAE 32-64-128-128, 256 px) and, for a GPU, 'sd15' (SD1.5's own
architecture with random weights, 512 px); the same for SDXL ('sdxl-tiny', 'sdxl-cpu', and 'sdxl': its 2.57 B-parameter UNet at 1024 px)
and FLUX.1 ('flux-tiny', 'flux-cpu', and 'flux': its 11.9 B-parameter transformer at 1024 px, which wants an 80 GB card in bf16); the newer
families at the tiny and CPU sizes ('sd3-tiny', 'sd3-cpu', 'z-image-tiny', 'z-image-cpu', 'qwen-image-tiny', 'qwen-image-cpu', 'flux2-klein-tiny',
'flux2-klein-cpu'), each beside the reference loop with that family's encoding. A path to a diffusers folder works too.

    .venv/bin/python tools/benchmark.py --edit-quality --models kontext-tiny --steps 80 --lr 1e-2  # an edit LoRA from image pairs, beside diffusers' Kontext example's loop

    .venv/bin/python tools/benchmark.py --models sd15 --batch 1 && .venv/bin/python tools/benchmark.py --models sd15 --batch 2   # on a GPU
    .venv/bin/python tools/benchmark.py --models sdxl,flux --batch 1 --steps 20 --no-fp32-check                               # on a large GPU"""
import argparse, json, os, re, resource, subprocess, sys, tempfile, time
from pathlib import Path

def presets() -> dict:
    "name -> (family, builder settings, resolution): the tiny models, each family's CPU-sized proportions, and the real architectures for a GPU"
    from cerebrium_ft import testing as t
    return {'tiny': ('sd1', {}, 64), 'sdxl-tiny': ('sdxl', {}, 64), 'flux-tiny': ('flux', {}, 64),
            'sd15-cpu': ('sd1', t.SD15_PROPORTIONED, 256), 'sdxl-cpu': ('sdxl', t.SDXL_PROPORTIONED, 256), 'flux-cpu': ('flux', t.FLUX_PROPORTIONED, 256),
            'sd15': ('sd1', t.SD15_ARCHITECTURE, 512), 'sdxl': ('sdxl', t.SDXL_ARCHITECTURE, 1024), 'flux': ('flux', t.FLUX_ARCHITECTURE, 1024),
            **{f"{f}-tiny": (f, {}, 64) for f in ('sd3', 'z-image', 'qwen-image', 'flux2-klein')},
            'sd3-cpu': ('sd3', t.SD3_PROPORTIONED, 256), 'z-image-cpu': ('z-image', t.Z_IMAGE_PROPORTIONED, 256),
            'qwen-image-cpu': ('qwen-image', t.QWEN_IMAGE_PROPORTIONED, 256), 'flux2-klein-cpu': ('flux2-klein', t.FLUX2_KLEIN_PROPORTIONED, 256),
            'kontext-tiny': ('kontext', {}, 64), 'kontext-cpu': ('kontext', t.FLUX_PROPORTIONED, 256)}

def _build(name, root):
    from cerebrium_ft.testing import build_tiny_pipeline
    if Path(name).is_dir(): return Path(name), None
    family, kw, res = presets()[name]
    return build_tiny_pipeline(Path(root)/name, family=family, **kw), res

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
    make_subject_images(root/'data', n=12, size=max(res, 512))  # the dataset contract: 512x512 photos
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    prior = dict(prior_class_prompt='a photo of a robot', num_prior_class_images=args.prior) if args.prior else {}
    spec = JobSpec('bench', str(model), str(root/'data'), 'a photo of sks robot', **prior, training_args=dict(
        resolution=res, train_batch_size=args.batch, max_train_steps=args.steps, num_validation_images=0, checkpointing_steps=10**6,
        mixed_precision=args.precision))
    # the libraries the reference imports before its clock starts: both clocks then leave them out
    import importlib
    for module, names in (('diffusers', ['AutoencoderKL', 'StableDiffusionPipeline', 'UNet2DConditionModel']), ('transformers', ['CLIPTextModel']), ('peft', ['LoraConfig'])):
        for n in names: getattr(importlib.import_module(module), n)  # diffusers and transformers import a class's module when it is first asked for
    # 1. the whole job through train(): load, class images, cache, train, save
    t0 = time.perf_counter()
    T.train(spec, root/'run', device=str(device), cache=root/'cache', progress=False)
    wall = time.perf_counter() - t0
    peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    peak_cuda = round(torch.cuda.max_memory_allocated() / 2**20) if device.type == 'cuda' else None
    rows = T.MetricsLog.read(root/'run'/'metrics.csv')
    el = [float(r['elapsed_s']) for r in rows]
    w = min(args.warmup, len(el) - 2)
    steady = (len(el) - 1 - w) / (el[-1] - el[w]) if el[-1] > el[w] else float('nan')
    # 2. where a step's time goes: the same pieces, timed one by one (synchronising, so slower than the real loop)
    parts, flops, ceiling, extra = breakdown(T, spec, device, args)
    man = json.loads((root/'run'/'manifest.json').read_text())
    out = dict(model=args.model, trainer='ours', device=device.type, resolution=res, batch=args.batch, steps=len(rows), wall_s=round(wall, 2),
               steps_per_s=round(steady, 3), peak_rss_mb=peak, optimizer=man['optimizer'], precision=man['precision'],
               breakdown_ms=parts, class_images=args.prior, losses=[float(r['loss']) for r in rows],
               denoiser_gflop_per_step=round(flops / 1e9, 1), ceiling_tflops=round(ceiling / 1e12, 2), flop_fraction=round(flops * steady / ceiling, 4))
    if peak_cuda is not None: out['peak_allocated_mb'] = peak_cuda
    out['job_s'] = job_phases(root/'run', wall)
    out['checkpoint_mb'], out['checkpoint_ms'] = extra['checkpoint']
    if 'attention_ms' in extra: out['attention_ms'] = extra['attention_ms']
    print(json.dumps(out))

def job_phases(run:Path, wall:float) -> dict:
    """Where a whole job's time went, as the run itself split it (the manifest's `time`: setup, class images, steps, checkpoints, validation, saving;
    validation includes scoring each checkpoint), with `outside`: the share of the job's wall time `wall` not spent in the steps"""
    split = json.loads((run/'manifest.json').read_text())['time']
    return dict(split, outside=round(1 - split['steps'] / wall, 3))

def reference(args):
    """The diffusers DreamBooth-LoRA example's per-step work, as a baseline loop (the example script is not vendored here):
    each step loads and resizes its images from disk, encodes them with the VAE, runs the text encoder, then the UNet
    forward and backward with PEFT LoRA on to_q/to_k/to_v/to_out.0, AdamW with gradient clipping at 1.0 and a scheduler
    step, and reads the loss back for its progress bar. Prior preservation first generates the class images with the
    pipeline's own scheduler at its default step count, batch 4."""
    import random
    import numpy as np, torch, torch.nn.functional as F
    from PIL import Image
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoTokenizer, CLIPTextModel
    from diffusers.training_utils import cast_training_params
    from cerebrium_ft.speed import precision_dtype
    from cerebrium_ft.testing import make_subject_images
    from cerebrium_ft.families import model_family
    root = Path(tempfile.mkdtemp(prefix='cft-ref-'))
    model, res = _build(args.model, root)
    family = model_family(str(model)).family
    res = args.resolution or res or 512
    data = Path(args.data) if args.data else root/'data'
    if not args.data: make_subject_images(data, n=12, size=max(res, 512))
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    torch.manual_seed(0); random.seed(0)
    if family.key not in ('sd1', 'sd2'): return reference_sdxl_flux(args, family, model, res, root, device)  # the transformer families and SDXL: the family's own encoding
    t0 = time.perf_counter()
    class_files = sorted(Path(args.class_dir).glob('*.png')) if args.class_dir else []
    if args.prior and not class_files:
        gen_dtype = precision_dtype(args.reference_precision)
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False, torch_dtype=gen_dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        if args.reference_sampler == 'dpm25':  # ours: DPM-Solver++ at 25 steps
            from diffusers import DPMSolverMultistepScheduler
            pipe.scheduler, sampler_kw = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config), dict(num_inference_steps=25)
        else: sampler_kw = {}  # the example: the pipeline's own scheduler at its default 50 steps
        (root/'class').mkdir()
        for i in range(0, args.prior, 4):
            for k, im in enumerate(pipe(['a photo of a robot'] * min(4, args.prior - i), height=res, width=res, **sampler_kw).images):
                im.save(root/'class'/f"{i + k:04d}.png"); class_files.append(root/'class'/f"{i + k:04d}.png")
        del pipe
    tok = AutoTokenizer.from_pretrained(model, subfolder='tokenizer')
    dtype = precision_dtype(args.reference_precision)  # the example's --mixed_precision
    te = CLIPTextModel.from_pretrained(model, subfolder='text_encoder').to(device, dtype)
    vae = AutoencoderKL.from_pretrained(model, subfolder='vae').to(device, dtype)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder='unet').to(device, dtype)
    sched = DDPMScheduler.from_pretrained(model, subfolder='scheduler')
    for m in (te, vae, unet): m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights='gaussian', target_modules=['to_k', 'to_q', 'to_v', 'to_out.0']))
    cast_training_params(unet, dtype=torch.float32)  # as the example: the LoRA trains in fp32
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    lr_sched = get_scheduler('constant', opt, num_warmup_steps=0, num_training_steps=args.steps)
    inst = sorted(data.glob('*.jpg'))
    def pixels(path):
        im = Image.open(path).convert('RGB'); w, h = im.size; s = min(w, h)
        im = im.resize((res, res), Image.Resampling.BILINEAR, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
        return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    stamps, snapshots, saving = [], [], 0.0  # saving: the time the quality mode's snapshots took, off the training clock
    for step in range(args.steps):
        files = random.sample(inst, args.batch) + (random.sample(class_files, args.batch) if class_files else [])
        prompts = ['a photo of sks robot'] * args.batch + ['a photo of a robot'] * (len(files) - args.batch)
        px = torch.stack([pixels(f) for f in files]).to(device, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):  # accelerate's mixed precision
            latents = vae.encode(px).latent_dist.sample() * vae.config.scaling_factor
            ids = tok(prompts, padding='max_length', max_length=tok.model_max_length, truncation=True, return_tensors='pt').input_ids.to(device)
            emb = te(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(files),), device=device)
            pred = unet(sched.add_noise(latents, noise, t), t, emb, return_dict=False)[0]
        if class_files:
            p, pp = pred.chunk(2); n, pn = noise.chunk(2)
            loss = F.mse_loss(p.float(), n.float()) + F.mse_loss(pp.float(), pn.float())
        else: loss = F.mse_loss(pred.float(), noise.float())
        _reference_step(loss, params, opt, lr_sched, stamps)
        if args.every and ((step + 1) % args.every == 0 or step + 1 == args.steps):  # the quality mode's snapshots: the training time so far (the job's, less the snapshots before), the job's
            snapshots.append((round(stamps[-1] - t0 - saving, 3), step + 1, str(root/'out'/f"step_{step + 1:06d}"), round(stamps[-1] - t0, 3)))
            s0 = time.perf_counter()
            StableDiffusionPipeline.save_lora_weights(snapshots[-1][2], unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
            saving += time.perf_counter() - s0
    StableDiffusionPipeline.save_lora_weights(root/'out', unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    _print_reference(args, res, t0, stamps, len(class_files), device, snapshots=snapshots, snapshot_s=round(saving, 1))

def _reference_step(loss, params, opt, lr_sched, stamps):
    "The example's step after the loss: backward, clipping at 1.0, AdamW and schedule steps, the loss read back for the progress bar"
    import torch
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step(); lr_sched.step(); opt.zero_grad()
    loss.detach().item()
    stamps.append(time.perf_counter())

def _print_reference(args, res, t0, stamps, class_images, device, **extra):
    "The reference run's figures, as JSON"
    import torch
    w = min(args.warmup, len(stamps) - 2)
    out = dict(model=args.model, trainer='reference', device=device.type, resolution=res, batch=args.batch, steps=args.steps,
               wall_s=round(time.perf_counter() - t0, 2), steps_per_s=round((len(stamps) - 1 - w) / (stamps[-1] - stamps[w]), 3),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), optimizer='AdamW', class_images=class_images,
               precision=args.reference_precision, sampler=args.reference_sampler, **extra)
    if device.type == 'cuda': out['peak_allocated_mb'] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(json.dumps(out))

def reference_sdxl_flux(args, family, model, res, root, device):
    """The per-step work of diffusers' `train_dreambooth_lora_{sdxl,flux,sd3,z_image,qwen_image,flux2_klein}.py` at their defaults, as a baseline loop:
    the prompts' embeddings computed once (the examples do when the text encoders are not trained), then each step loads and resizes its
    images from disk, encodes them with the VAE as the family does (no --cache_latents), noises them (DDPM timesteps for SDXL; flow matching
    with the example's weighting scheme for the others: uniform, logit-normal for SD3), runs the denoiser forward and backward with PEFT LoRA on the same modules as ours (so that the loop is compared,
    not the LoRA's size), AdamW with gradient clipping at 1.0 and a scheduler step, and reads the loss back for its progress bar. Prior
    preservation first generates the class images with the pipeline's own scheduler at its default step count, batch 4."""
    import random
    import numpy as np, torch, torch.nn.functional as F
    from PIL import Image
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from cerebrium_ft.families import denoiser_of, encode_text, load_parts, noised, peft_targets, pipeline_class, predict, sampling_scheduler, text_encoders
    from cerebrium_ft.speed import precision_dtype
    t0 = time.perf_counter()
    dtype = precision_dtype(args.reference_precision)
    class_files = sorted(Path(args.class_dir).glob('*.png')) if args.class_dir else []
    if args.prior and not class_files:
        pipe = pipeline_class(family).from_pretrained(model, torch_dtype=dtype).to(device); pipe.set_progress_bar_config(disable=True)
        sampler_kw = {}
        if args.reference_sampler == 'dpm25':  # ours: DPM-Solver++ (FLUX.1: its flow-matching Euler) at 25 steps
            pipe.scheduler, sampler_kw = sampling_scheduler(family, pipe.scheduler.config), dict(num_inference_steps=25)
        (root/'class').mkdir()
        for i in range(0, args.prior, 4):
            for k, im in enumerate(pipe(prompt=['a photo of a robot'] * min(4, args.prior - i), height=res, width=res, **sampler_kw).images):
                im.save(root/'class'/f"{i + k:04d}.png"); class_files.append(root/'class'/f"{i + k:04d}.png")
        del pipe
    m = load_parts(str(model), 'main', family)
    for _, enc in text_encoders(m): enc.to(device, dtype).requires_grad_(False)
    cond = encode_text(family, m, ['a photo of sks robot', 'a photo of a robot'], device, dtype, res)
    for k in [k for k in m if k.startswith('text_encoder')]: m[k] = None
    vae = m['vae'].to(device, torch.float32 if dtype == torch.float16 else dtype).requires_grad_(False)  # the examples keep an fp16 VAE in fp32
    net = denoiser_of(family, m).to(device, dtype).requires_grad_(False)
    net.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights='gaussian', target_modules=peft_targets(net, family.lora_targets)))
    cast_training_params(net, dtype=torch.float32)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    lr_sched = get_scheduler('constant', opt, num_warmup_steps=0, num_training_steps=args.steps)
    sched, gen = m['noise_scheduler'], torch.Generator(device).manual_seed(0)
    inst = sorted((Path(args.data) if args.data else root/'data').glob('*.jpg'))
    def pixels(path):
        im = Image.open(path).convert('RGB'); w, h = im.size; s = min(w, h)
        im = im.resize((res, res), Image.Resampling.BILINEAR, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
        return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    stamps, (scaling, shift) = [], family.latent_scaling(vae, device)
    for step in range(args.steps):
        files = random.sample(inst, args.batch) + (random.sample(class_files, args.batch) if class_files else [])
        which = torch.tensor([0] * args.batch + [1] * (len(files) - args.batch), device=device)
        px = torch.stack([pixels(f) for f in files]).to(device, vae.dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                mean, std = family.latent_dist(vae, px)  # as the family encodes (FLUX.2's 2x2 patches, Qwen-Image's one-frame video)
                latents = ((mean + std * torch.randn_like(std) - shift) * scaling).float()
            noisy, t, target = noised(family, sched, latents, gen)
            pred = predict(family, net, noisy, t, {k: v[which] for k, v in cond.items()})
        if class_files:
            (p, pp), (g, gp) = pred.float().chunk(2), target.float().chunk(2)
            loss = F.mse_loss(p, g) + F.mse_loss(pp, gp)
        else: loss = F.mse_loss(pred.float(), target.float())
        _reference_step(loss, params, opt, lr_sched, stamps)
    pipeline_class(family).save_lora_weights(root/'out', **{f"{family.denoiser}_lora_layers": get_peft_model_state_dict(net)})
    _print_reference(args, res, t0, stamps, len(class_files), device)

def breakdown(T, spec, device, args, n=None):
    "The trainer's step taken apart (with prior preservation, at twice the batch): the same precision, attention processor and optimizer, each piece timed on its own"
    import torch
    from peft import LoraConfig
    from diffusers.training_utils import cast_training_params
    from cerebrium_ft.families import denoiser_of, encode_text, model_family, noised, peft_targets, predict, text_encoders
    from cerebrium_ft.speed import precision_dtype, resolve_precision, use_fused_attention
    s, family = spec.training_args, model_family(spec.hf_model_path).family
    dtype = precision_dtype(resolve_precision(s.mixed_precision, device))
    m = T.load_models(spec.hf_model_path, family=family)
    net = denoiser_of(family, m).to(device, dtype); net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.rank, init_lora_weights='gaussian', target_modules=peft_targets(net, family.lora_targets)))
    cast_training_params(net, dtype=torch.float32); use_fused_attention(net, device)
    vae = m['vae'].to(device)
    for _, enc in text_encoders(m): enc.to(device)
    paths = sorted(Path(spec.dataset).glob('*.jpg'))
    mean, std = T.encode_images(vae, torch.stack(T.load_pixels(paths, s.resolution)[0]), False, 4, device, torch.float32, family)
    batch = args.batch * (2 if args.prior else 1)  # prior preservation: each step also takes as many class images
    cond = {k: v.expand(batch, *v.shape[1:]) for k, v in encode_text(family, m, [spec.training_prompt], device, dtype, s.resolution).items()}
    params = [p for p in net.parameters() if p.requires_grad]
    opt = T.make_optimizer(params, s, s.learning_rate, device)
    gen = torch.Generator(device).manual_seed(0)
    sync = _sync(device)
    times = dict(sample=[], forward=[], backward=[], optimizer=[])
    sched, (scaling, shift) = m['noise_scheduler'], family.latent_scaling(vae, device)
    for i in range(args.warmup + (n or min(args.steps, 10))):
        t = [time.perf_counter()]
        idx = torch.randint(0, len(paths), (batch,), generator=gen, device=device)
        latents, _ = T.sample_latents(mean, std, idx, False, gen, scaling, shift)
        noisy, ts, target = noised(family, sched, latents, gen); sync(); t.append(time.perf_counter())
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = predict(family, net, noisy, ts, cond)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float()); sync(); t.append(time.perf_counter())
        loss.backward(); sync(); t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm); opt.step(); opt.zero_grad(set_to_none=True); sync(); t.append(time.perf_counter())
        if i >= args.warmup:
            for k, a, b in zip(times, t, t[1:]): times[k].append((b - a) * 1000)
    from torch.utils.flop_counter import FlopCounterMode
    def fwd_bwd():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            predict(family, net, noisy, ts, cond).float().square().mean().backward()
    with FlopCounterMode(display=False) as fc: fwd_bwd()
    extra = dict(checkpoint=checkpoint_cost(T, net, opt, gen))
    if device.type == 'cpu' and dtype == torch.bfloat16 and family.denoiser == 'unet':  # attention trained through runs in fp32 on CPU: what that saves
        from cerebrium_ft.speed import FusedLoraAttnProcessor
        extra['attention_ms'] = {}
        for name, fp32 in (('fp32', True), ('bf16', False)):
            net.set_attn_processor(FusedLoraAttnProcessor(fp32_scores=fp32))
            extra['attention_ms'][name] = round(1000 * min(_timed(fwd_bwd) for _ in range(3)))
    return {k: round(sum(v) / len(v), 2) for k, v in times.items()}, fc.get_total_flops(), matmul_ceiling(device, dtype), extra

def _timed(f) -> float:
    t = time.perf_counter(); f(); return time.perf_counter() - t

def checkpoint_cost(T, net, opt, gen) -> tuple:
    "(MB, ms) of one resumable checkpoint of this LoRA and optimizer, the fastest of 5 writes"
    from diffusers.optimization import get_scheduler
    run = T.RunDir(tempfile.mkdtemp(prefix='cft-ckpt-'))
    sched = get_scheduler('constant', opt)
    ms = min(_timed(lambda: T.save_checkpoint(run, i, net, opt, sched, gen)) for i in range(1, 6)) * 1000
    mb = sum(f.stat().st_size for f in run.latest_checkpoint().iterdir()) / 2**20
    return round(mb, 1), round(ms)

def _sync(device):
    "A function that waits for `device`'s queued work (nothing to wait for on a CPU)"
    import torch
    return torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

def matmul_ceiling(device, dtype) -> float:
    "FLOP/s of a large square matrix product in `dtype` on `device`: what the UNet's products could reach at best"
    import torch
    n = 8192 if device.type == 'cuda' else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = _sync(device)
    best = float('inf')
    for _ in range(5):
        a @ b; sync(); t = time.perf_counter(); a @ b; sync(); best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best

QUALITY_DRAWS = 8 # noise draws (a timestep and its noise) per image when a LoRA's losses are measured

def quality_child(args):
    "Our trainer on the quality mode's data, a usable LoRA kept every `--every` steps or so; its snapshots (job time so far, step, LoRA folder) as JSON"
    import torch
    from cerebrium_ft import train as T
    from cerebrium_ft.config import JobSpec
    import logging; logging.getLogger('cerebrium_ft').setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix='cft-quality-'))
    model, res = _build(args.model, root)
    n_class = len(list(Path(args.class_dir).glob('*.png'))) if args.class_dir else 0
    prior = dict(prior_class_prompt='a photo of a robot', prior_class_image_dir=args.class_dir, num_prior_class_images=n_class) if n_class else {}
    n = len(list(Path(args.data).glob('*.jpg')))
    per_epoch = -(-max(n, n_class) // args.batch)
    spec = JobSpec('quality', str(model), args.data, 'a photo of sks robot', **prior, training_args=dict(
        resolution=args.resolution or res, train_batch_size=args.batch, max_train_steps=args.steps, learning_rate=args.lr, num_validation_images=0,
        validation_epochs=max(1, args.every // per_epoch), checkpointing_steps=10**6, mixed_precision=args.precision, snr_gamma=args.snr_gamma,
        **json.loads(args.ours_args or '{}')))
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    out = T.train(spec, root/'run', device=str(device), progress=False)
    elapsed = {int(r['step']): float(r['elapsed_s']) for r in T.MetricsLog.read(out/'metrics.csv')}
    scoring = {int(s): float(t) for s, t in re.findall(r'checkpoint of step (\d+) \(epoch \d+\): score \S+ in ([\d.]+) s', (out/'logs.txt').read_text())}  # each validation's scoring and keeping
    m = json.loads((out/'manifest.json').read_text())
    snaps = [(round(elapsed[c['step']] - sum(t for s, t in scoring.items() if s < c['step']), 3), c['step'], str((out/c['weights']).parent), elapsed[c['step']])
             for c in m['checkpoints'] if c['weights']]  # as the reference's: the training time so far (the job's, less the validations before), the job's
    print(json.dumps(dict(trainer='ours', precision=m['precision'], optimizer=m['optimizer'], snapshots=snaps, best=m['best'], wall_s=m['train_seconds'],
                          snapshot_s=round(sum(t for s, t in scoring.items() if s < m['steps']), 1))))

def measure(model:str, lora:str|None, images:list, prompt:str, res:int, seed:int=1234) -> float:
    "The mean denoising loss of `images` under `prompt` with the LoRA in folder `lora` (None: the base model), on fixed draws: plain diffusers, none of the trainers' code"
    import numpy as np, torch
    from PIL import Image
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    if lora: pipe.load_lora_weights(lora)
    def px(f):
        im = Image.open(f).convert('RGB'); w, h = im.size; s = min(w, h)
        im = im.resize((res, res), Image.Resampling.BILINEAR, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
        return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    g, total = torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        latents = pipe.vae.encode(torch.stack([px(f) for f in images])).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([prompt], padding='max_length', max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors='pt').input_ids
        emb = pipe.text_encoder(ids)[0]
        sched = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
        for x in latents.repeat_interleave(QUALITY_DRAWS, 0).split(8):
            noise = torch.randn(x.shape, generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(x),), generator=g)
            pred = pipe.unet(sched.add_noise(x, noise, t), t, emb.expand(len(x), -1, -1)).sample
            target = noise if sched.config.prediction_type == 'epsilon' else sched.get_velocity(x, noise, t)
            total += ((pred - target) ** 2).mean(dim=(1, 2, 3)).tolist()
    return sum(total) / len(total)

def quality(args):
    """--quality: our trainer and the reference loop on the same model, data, steps and learning rate; each LoRA kept along the way is
    measured by one evaluator (plain diffusers) on fixed noise and timesteps: the held-out instance loss, the class prompt's loss drift,
    and the time each trainer took to reach the reference's final held-out loss"""
    import shutil
    from cerebrium_ft.testing import make_subject_images
    name = args.models.split(',')[0]
    if name not in ('tiny', 'sd15-cpu', 'sd15'): raise SystemExit("--quality measures the Stable Diffusion 1.x presets: tiny, sd15-cpu or sd15")
    root = Path(tempfile.mkdtemp(prefix='cft-quality-'))
    model, res = _build(name, root)
    res = args.resolution or res
    photos = make_subject_images(root/'all', n=12, size=max(res, 512))
    (root/'data').mkdir()
    for p in photos[:10]: shutil.copy(p, root/'data'/p.name)
    heldout = photos[10:]  # two photos no trainer sees
    class_dir = None
    if args.prior:
        import torch
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config); pipe.set_progress_bar_config(disable=True)
        class_dir = root/'class'; class_dir.mkdir()
        (root/'class_heldout').mkdir()  # as many more that neither trainer sees: the class prompt's loss on them says how much of the prior is forgotten
        for i in range(2 * args.prior):
            pipe('a photo of a robot', height=res, width=res, num_inference_steps=25, generator=torch.Generator().manual_seed(i)).images[0].save((class_dir if i < args.prior else root/'class_heldout')/f"{i:04d}.png")
    class_images = sorted((root/'class_heldout').glob('*.png'))[:8] if class_dir else photos[:0]
    every = args.every or max(1, args.steps // 8)
    common = argparse.Namespace(**{**vars(args), 'every': every, 'data': str(root/'data'), 'class_dir': str(class_dir) if class_dir else None, 'resolution': res})
    runs = [('reference', _run(name, 'reference', common)), ('ours', _run(name, 'quality', common))]
    if not args.no_snr: runs.append(('ours snr 5', _run(name, 'quality', argparse.Namespace(**{**vars(common), 'snr_gamma': 5.0}))))
    variants = [('ours te', {'train_text_encoder': True}, args.no_text_encoder),  # the evaluator loads the text encoders' LoRA too (load_lora_weights), so it measures their part
                ('ours layers', {'lora_layers': 'transformer'}, args.no_lora_layers), ('ours lora+ 16', {'loraplus_lr_ratio': 16}, args.no_loraplus)]
    for label, settings, skip in variants:
        if not skip: runs.append((label, _run(name, 'quality', argparse.Namespace(**{**vars(common), 'ours_args': json.dumps({**json.loads(args.ours_args or '{}'), **settings})}))))
    base_held, base_cls = measure(str(model), None, heldout, 'a photo of sks robot', res), (measure(str(model), None, class_images, 'a photo of a robot', res) if class_dir else None)
    print(f"cerebrium-ft quality benchmark: {name}, {res} px, {args.steps} steps, lr {args.lr:g}, batch {args.batch}, {args.prior} class images; "
          f"10 photos trained on, 2 held out; {QUALITY_DRAWS} fixed draws per image; base model held-out loss {base_held:.5f}"
          + (f"; class drift: the class prompt's loss on {len(class_images)} more class images neither trainer saw, against the base model's {base_cls:.5f} (above 0: the prior forgotten)" if class_dir else ''))
    results = {}
    for label, o in runs:
        curve = [(t, step, measure(str(model), lora, heldout, 'a photo of sks robot', res)) for t, step, lora, _ in o['snapshots']]
        drift = measure(str(model), o['snapshots'][-1][2], class_images, 'a photo of a robot', res) - base_cls if class_dir else None
        results[label] = (curve, drift, o)
    ref_curve = results['reference'][0]
    target, ref_t = ref_curve[-1][2], ref_curve[-1][0]
    print(f"{'trainer':13} {'precision':9} {'optimizer':10} {'held-out':>9} {'class drift':>11} {'job s':>6} {'snaps s':>7} {'train s':>7} {'time to ref final':>17}  curve (step: held-out loss)")
    for label, (curve, drift, o) in results.items():
        reach = next((t for t, _, l in curve if l <= target), None)
        when = f"{reach:.1f} s ({reach / ref_t:.2f}x)" if reach is not None else 'not reached'
        print(f"{label:13} {o.get('precision', 'no').replace('no', 'fp32'):9} {o['optimizer']:10} {curve[-1][2]:>9.5f} {'-' if drift is None else f'{drift:+.5f}':>11} "
              f"{o['snapshots'][-1][3]:>6.1f} {o['snapshot_s']:>7.1f} {curve[-1][0]:>7.1f} {when:>17}  " + ' '.join(f"{s}:{l:.4f}" for _, s, l in curve))
    print(f"target: ours reaches the reference's final held-out loss ({target:.5f}, at {ref_t:.1f} s) in at most 0.5x its time, with class drift no worse. "
          "Times are training time: the job's (job s) less what the benchmark's snapshots cost (snaps s: our checkpoint scoring at each validation, the reference's LoRA saves). "
          "Random-weight models: these figures say whether the loop learns as fast as the reference's, not how good a LoRA of a real model looks.")

EDIT = 'make it colour' # the edit quality mode's instruction: each pair is a photo (the target) and its grey version (the input)

def edit_loss(model:str, lora:str|None, targets:list, inputs:list, res:int, seed:int=1234) -> float:
    "The mean denoising loss of edit pairs (`targets`, each with its input in `inputs`) under `EDIT`, with the LoRA in folder `lora` (None: the base model), on fixed draws"
    import torch
    from cerebrium_ft.families import denoiser_of, encode_text, load_parts, model_family, noised, predict
    from cerebrium_ft.train import load_pixels
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()  # a bar per load, five loads a run
    family = model_family(model).family
    m = load_parts(model, 'main', family); net, vae = denoiser_of(family, m), m['vae']
    if lora: net.load_lora_adapter(lora, weight_name='pytorch_lora_weights.safetensors', prefix=family.denoiser)
    (scaling, shift), total = family.latent_scaling(vae, 'cpu'), []
    with torch.no_grad():
        encode = lambda paths: (family.latent_dist(vae, torch.stack(load_pixels(paths, res)[0]))[0] - shift) * scaling
        latents, control = encode(targets), encode(inputs)
        cond = {k: v.expand(len(targets), *v.shape[1:]) for k, v in encode_text(family, m, [EDIT], 'cpu', torch.float32, res).items()}
        for k in range(QUALITY_DRAWS):
            noisy, t, target = noised(family, m['noise_scheduler'], latents, torch.Generator().manual_seed(seed + k))
            total += (predict(family, net, noisy, t, dict(cond, control=control)) - target).square().mean(dim=(1, 2, 3)).tolist()
    return sum(total) / len(total)

def reference_edit(args, family, model, res, root, device):
    """The per-step work of diffusers' `train_dreambooth_lora_flux_kontext.py` at its defaults, as a baseline loop: the instruction's embeddings computed once,
    then each step loads its targets and their inputs from disk, encodes both with the VAE (a draw of each distribution, as the example), noises the targets
    by flow matching with uniform noise levels, runs the transformer forward and backward with the inputs' packed latents after the noisy ones (position ids
    whose first axis is 1) and the guidance embedding at 3.5, PEFT LoRA on the same modules as ours, AdamW with clipping at 1.0"""
    import random
    import torch, torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from cerebrium_ft.families import denoiser_of, encode_text, load_parts, noised, peft_targets, pipeline_class, predict, text_encoders
    from cerebrium_ft.train import load_pixels
    t0 = time.perf_counter()
    m = load_parts(str(model), 'main', family)
    for _, enc in text_encoders(m): enc.to(device).requires_grad_(False)
    cond = encode_text(family, m, [EDIT], device, torch.float32, res)
    for k in [k for k in m if k.startswith('text_encoder')]: m[k] = None
    vae = m['vae'].to(device).requires_grad_(False)
    net = denoiser_of(family, m).to(device).requires_grad_(False)
    net.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights='gaussian', target_modules=peft_targets(net, family.lora_targets)))
    cast_training_params(net, dtype=torch.float32)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    lr_sched = get_scheduler('constant', opt, num_warmup_steps=0, num_training_steps=args.steps)
    gen, stamps, (scaling, shift) = torch.Generator(device).manual_seed(0), [], family.latent_scaling(vae, device)
    targets, rng = sorted(Path(args.data).glob('*.jpg')), random.Random(0)
    for step in range(args.steps):
        files = rng.sample(targets, args.batch)
        with torch.no_grad():
            draw = lambda paths: (vae.encode(torch.stack(load_pixels(paths, res)[0]).to(device)).latent_dist.sample() - shift) * scaling
            latents, control = draw(files), draw([Path(args.data)/'control'/f"{f.stem}.png" for f in files])
        noisy, t, target = noised(family, m['noise_scheduler'], latents, gen)
        pred = predict(family, net, noisy, t, dict({k: v.expand(len(files), *v.shape[1:]) for k, v in cond.items()}, control=control))
        _reference_step(F.mse_loss(pred.float(), target.float()), params, opt, lr_sched, stamps)
    pipeline_class(family).save_lora_weights(root/'out', transformer_lora_layers=get_peft_model_state_dict(net))
    _print_reference(args, res, t0, stamps, 0, device, lora=str(root/'out'))

def edit_reference(args):
    "The reference loop on the edit quality mode's pairs; its figures and LoRA folder as JSON"
    import torch
    from cerebrium_ft.families import model_family
    root = Path(tempfile.mkdtemp(prefix='cft-edit-'))
    model, res = _build(args.model, root)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    reference_edit(args, model_family(str(model)).family, model, args.resolution or res, root, device)

def edit_quality(args):
    """--edit-quality: an edit LoRA learnt from pairs (a photo from its grey version) by our trainer and by the reference loop of diffusers' Kontext example
    (`reference_edit`), on the same model, pairs, steps and learning rate; one evaluator (`edit_loss`) measures the held-out pairs' loss with the base model
    and each LoRA, each pair given its own input and given another pair's (a LoRA that reads its input does better with its own)"""
    import shutil
    from PIL import Image
    from cerebrium_ft.testing import make_subject_images
    name = args.models.split(',')[0]
    if not name.startswith('kontext'): raise SystemExit("--edit-quality measures the FLUX.1 Kontext presets, beside diffusers' Kontext example: kontext-tiny or kontext-cpu")
    root = Path(tempfile.mkdtemp(prefix='cft-edit-'))
    model, res = _build(name, root)
    res = args.resolution or res
    photos = make_subject_images(root/'all', n=10, size=max(res, 256))
    (root/'data'/'control').mkdir(parents=True); (root/'held'/'control').mkdir(parents=True)
    for k, p in enumerate(photos):
        to = root/('data' if k < 8 else 'held')
        shutil.copy(p, to/p.name); Image.open(p).convert('L').convert('RGB').save(to/'control'/f"{p.stem}.png")
    held = sorted((root/'held').glob('*.jpg')); own = [root/'held'/'control'/f"{p.stem}.png" for p in held]
    common = argparse.Namespace(**{**vars(args), 'data': str(root/'data'), 'resolution': res})
    runs = [('reference', _run(name, 'edit-reference', common)), ('ours', _run(name, 'edit-ours', common))]
    print(f"cerebrium-ft edit quality benchmark: {name} (FLUX.1 Kontext), {res} px, {args.steps} steps, lr {args.lr:g}, batch {args.batch}; 8 pairs trained on "
          f"({EDIT!r}: a photo from its grey version), 2 held out; {QUALITY_DRAWS} fixed draws per pair")
    print(f"{'trainer':10} {'held-out loss':>13} {'of base':>8} {'another input':>13} {'job s':>6}")
    base = edit_loss(str(model), None, held, own, res)
    print(f"{'base':10} {base:>13.5f} {1:>8.3f} {edit_loss(str(model), None, held, own[::-1], res):>13.5f} {'-':>6}")
    for label, o in runs:
        loss = edit_loss(str(model), o['lora'], held, own, res)
        print(f"{label:10} {loss:>13.5f} {loss / base:>8.3f} {edit_loss(str(model), o['lora'], held, own[::-1], res):>13.5f} {o['wall_s']:>6.1f}")
    print("target: ours lowers the held-out pairs' loss at least as far as the reference loop (of base no higher). 'another input': the same loss with each held-out target given "
          "the other's input: about the own-input loss, a model that barely reads its input; above it, one that does. Random-weight models: whether the loop learns the "
          "edit as the reference's does, not how good an edit of a real model looks")

def edit_ours(args):
    "Our trainer on the edit quality mode's pairs; its LoRA folder and times as JSON"
    import logging; logging.getLogger('cerebrium_ft').setLevel(logging.WARNING)
    from cerebrium_ft import train as T
    from cerebrium_ft.config import JobSpec
    root = Path(tempfile.mkdtemp(prefix='cft-edit-'))
    model, res = _build(args.model, root)
    spec = JobSpec('edit', str(model), args.data, EDIT, training_args=dict(resolution=args.resolution or res, train_batch_size=args.batch, max_train_steps=args.steps,
                                                                         learning_rate=args.lr, num_validation_images=0, checkpointing_steps=10**6, mixed_precision=args.precision,
                                                                         **json.loads(args.ours_args or '{}')))
    out = T.train(spec, root/'run', device=args.device, progress=False)
    m = json.loads((out/'manifest.json').read_text())
    print(json.dumps(dict(trainer='ours', precision=m['precision'], optimizer=m['optimizer'], wall_s=m['train_seconds'], lora=str((out/m['lora']['weights']).parent))))

def _run(name, trainer, args):
    "One configuration in a fresh process; its figures"
    flags = sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in vars(args).items()
                 if k in ('steps', 'warmup', 'batch', 'resolution', 'device', 'prior', 'precision', 'reference_precision', 'reference_sampler',
                          'lr', 'every', 'data', 'class_dir', 'snr_gamma', 'ours_args') and v is not None), [])
    r = subprocess.run([sys.executable, __file__, '--model', name, '--trainer', trainer, *flags], capture_output=True, text=True)
    if r.returncode: raise RuntimeError(f"{name} / {trainer} failed:\n{r.stderr[-3000:]}")
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    if getattr(args, 'raw', None):  # each run's figures as soon as it ends, so a benchmark stopped part-way keeps what it measured
        with open(args.raw, 'a') as f: f.write(json.dumps(dict(figures, run=trainer, settings={k: v for k, v in vars(args).items() if k != 'raw'})) + '\n')
    return figures

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', default='tiny,sd15-cpu', help="comma-separated: " + ', '.join(presets()) + ", or diffusers folders")
    ap.add_argument('--steps', type=int, default=40, help="training steps per run")
    ap.add_argument('--warmup', type=int, default=3, help="steps left out of the steady-state rate")
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--prior', type=int, default=0, help="class images for prior preservation (generated fresh by both trainers)")
    ap.add_argument('--resolution', type=int, default=None, help="default: the model's own (64 for the tiny ones, 256 for the -cpu ones, 512 sd15, 1024 sdxl and flux)")
    ap.add_argument('--device', default=None)
    ap.add_argument('--precision', default='auto', help="our trainer's mixed_precision: auto, no, fp16, bf16")
    ap.add_argument('--reference-precision', default='no', choices=['no', 'fp16', 'bf16'],
                    help="the reference's --mixed_precision: 'no' (fp32) is the example's default")
    ap.add_argument('--reference-sampler', default='default', choices=['default', 'dpm25'],
                    help="the reference's class images: 'default' (the pipeline's scheduler, 50 steps, as the example) or 'dpm25' (DPM-Solver++ 25 steps, as ours)")
    ap.add_argument('--no-like-for-like', action='store_true', help="skip the reference run in our precision and with our class-image sampler")
    ap.add_argument('--no-fp32-check', action='store_true', help="skip the run of our trainer in fp32 that checks the loss curve is unchanged")
    ap.add_argument('--no-reference', action='store_true', help="only our trainer")
    ap.add_argument('--quality', action='store_true', help="measure learning instead of speed: held-out loss, class drift and time to the reference's final held-out loss")
    ap.add_argument('--edit-quality', action='store_true', help="measure an edit LoRA's learning from image pairs (--models kontext-tiny or kontext-cpu) beside the reference loop of diffusers' Kontext example")
    ap.add_argument('--lr', type=float, default=5e-4, help="learning rate of both trainers (5e-4: the seed's default)")
    ap.add_argument('--every', type=int, default=0, help="--quality: keep a LoRA about every this many steps (default: steps / 8)")
    ap.add_argument('--no-snr', action='store_true', help="--quality: skip the run of ours with snr_gamma 5")
    ap.add_argument('--no-text-encoder', action='store_true', help="--quality: skip the run of ours with train_text_encoder")
    ap.add_argument('--no-lora-layers', action='store_true', help="--quality: skip the run of ours with lora_layers transformer")
    ap.add_argument('--no-loraplus', action='store_true', help="--quality: skip the run of ours with loraplus_lr_ratio 16")
    ap.add_argument('--ours-args', default=None, help='--quality: more training settings for our runs, as JSON (e.g. \'{"use_8bit_adam": false}\')')
    ap.add_argument('--raw', default=None, help="also append each run's figures to this file as a line of JSON, as soon as the run ends")
    ap.add_argument('--model', help=argparse.SUPPRESS)
    ap.add_argument('--trainer', default='ours', help=argparse.SUPPRESS)
    ap.add_argument('--data', help=argparse.SUPPRESS)
    ap.add_argument('--class-dir', help=argparse.SUPPRESS)
    ap.add_argument('--snr-gamma', type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model: return {'ours': child, 'reference': reference, 'quality': quality_child, 'edit-ours': edit_ours, 'edit-reference': edit_reference}[args.trainer](args)
    if args.quality: return quality(args)
    if args.edit_quality: return edit_quality(args)
    print(f"cerebrium-ft training benchmark: {args.steps} steps, batch {args.batch}, {args.prior} class images, {os.cpu_count()} CPUs")
    print("reference: a baseline loop doing the diffusers DreamBooth-LoRA example's per-step work (the example script is not vendored)")
    head = f"{'model':10} {'trainer':10} {'device':6} {'px':>4} {'steps/s':>8} {'wall s':>7} {'peak RSS MB':>11}  notes"
    print(head); print('-' * len(head))
    flop_fractions = []
    for name in args.models.split(','):
        ours = _run(name, 'ours', args)
        runs = [('ours', ours)]
        if ours['precision'] != 'no' and not args.no_fp32_check:
            runs.append(('ours fp32', _run(name, 'ours', argparse.Namespace(**{**vars(args), 'precision': 'no'}))))
        if not args.no_reference: runs.append(('reference', _run(name, 'reference', args)))
        same = dict(reference_precision=ours['precision'], reference_sampler='dpm25' if args.prior else args.reference_sampler)
        if not args.no_reference and not args.no_like_for_like and any(getattr(args, k) != v for k, v in same.items()):
            runs.append(('ref alike', _run(name, 'reference', argparse.Namespace(**{**vars(args), **same}))))
        for trainer, o in runs:
            note = ', '.join(filter(None, [o.get('precision', 'no').replace('no', 'fp32'), o['optimizer'],
                                           ('class images: ' + ('DPM-Solver++ 25 steps' if o.get('sampler', 'dpm25') == 'dpm25' else "the pipeline's own scheduler and steps")) if o.get('class_images') else '',
                                           f"peak allocated {o['peak_allocated_mb']} MB" if 'peak_allocated_mb' in o else '']))
            if 'job_s' in o: note += ", job s: " + ' / '.join(f"{k} {v}" for k, v in o['job_s'].items() if k != 'outside' and v) + f" ({o['job_s']['outside']:.0%} outside the steps)"
            if 'breakdown_ms' in o: note += ", step ms: sample {sample:.1f} / forward {forward:.1f} / backward {backward:.1f} / optimizer {optimizer:.1f}".format(**o['breakdown_ms'])
            if 'flop_fraction' in o: note += f"; denoiser {o['denoiser_gflop_per_step']} GFLOP a step, {o['flop_fraction']:.1%} of a {o['ceiling_tflops']} TFLOP/s matmul"
            if 'flop_fraction' in o and o['device'] == 'cuda': flop_fractions.append((o['model'], trainer, o['flop_fraction']))
            print(f"{o['model']:10} {trainer:10} {o['device']:6} {o['resolution']:>4} {o['steps_per_s']:>8.2f} {o['wall_s']:>7.1f} {o['peak_rss_mb']:>11}  {note}")
        for label, key, what in (('ours/ref', 'reference', 'defaults against defaults'), ('ours/alike', 'ref alike', 'like for like: the same precision and class-image sampler')):
            if (ref := dict(runs).get(key)):
                print(f"{'':10} {label:10} {'':6} {'':>4} {ours['steps_per_s'] / ref['steps_per_s']:>7.2f}x {ours['wall_s'] / ref['wall_s']:>6.2f}x "
                      f"{ours['peak_rss_mb'] / ref['peak_rss_mb']:>10.2f}x  {what} (targets: steps/s >= 2.0x, wall <= {0.5 if args.prior else 0.6}x, memory <= 1.0x)")
        if 'checkpoint_ms' in ours: print(f"{'':10} checkpoint: {ours['checkpoint_mb']} MB (LoRA, optimizer and RNG states) written in {ours['checkpoint_ms']} ms")
        if 'attention_ms' in ours: print(f"{'':10} training step (forward and backward) with attention in fp32 {ours['attention_ms']['fp32']} ms, in bf16 {ours['attention_ms']['bf16']} ms")
        fp32 = dict(runs).get('ours fp32')
        if fp32: print(loss_agreement(ours, fp32))
    for model, trainer, f in flop_fractions: print(f"{model} {trainer}: {f:.1%} of the denoiser's FLOP ceiling (target on a GPU: >= 30%)")

def loss_agreement(a, b) -> str:
    "How far apart two runs' per-step losses are (same seed, so the same noise and timesteps), next to how much the loss moves from step to step"
    la, lb = a['losses'], b['losses']
    gap = sum(abs(x - y) for x, y in zip(la, lb)) / len(la)
    spread = sum(abs(x - y) for x, y in zip(lb, lb[1:])) / (len(lb) - 1)
    mean = sum(lb) / len(lb)
    return (f"{'':10} loss curve: {a['precision']} vs fp32, same seed, {len(la)} steps: mean |difference| {gap:.5f} ({gap / mean:.2%} of the mean loss {mean:.4f}); "
            f"the loss itself moves {spread:.4f} a step")

if __name__ == '__main__': main()
