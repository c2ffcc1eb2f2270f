"The benchmark script runs and prints its figures (the figures themselves are reported, never asserted)"
import re, subprocess, sys
from pathlib import Path

def test_benchmark_prints_figures():
    script = Path(__file__).resolve().parent.parent/'tools'/'benchmark.py'
    r = subprocess.run([sys.executable, script, '--models', 'tiny', '--steps', '8', '--prior', '2'], capture_output=True, text=True, timeout=3600)  # a bound for a busy machine: the figures take what they take
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith('tiny'))
    assert 'AdamW8bit' in line and len(line.split()) >= 8, r.stdout
    assert 'ours/ref' in r.stdout and 'reference' in r.stdout
    assert 'ours/alike' in r.stdout and 'ref alike' in r.stdout  # like for like: the reference with our precision and class-image sampler
    assert 'class images: DPM-Solver++ 25 steps' in r.stdout and "class images: the pipeline's own scheduler and steps" in r.stdout
    assert 'checkpoint: ' in r.stdout and ' ms' in r.stdout.split('checkpoint: ')[1].splitlines()[0]
    split = re.search(r'job s: setup ([\d.]+) / class images ([\d.]+) / steps ([\d.]+) .*?\((\d+)% outside the steps\)', line)  # the run's own split, from its manifest
    assert split and float(split[2]) > 0 and float(split[3]) > 0, line
    import torch
    from cerebrium_ft.speed import resolve_precision
    if resolve_precision('auto', torch.device('cpu')) != 'no':  # half precision here: a fp32 run of ours checks the loss curve
        assert 'ours fp32' in r.stdout and 'loss curve: bf16 vs fp32' in r.stdout, r.stdout

def test_benchmark_runs_sdxl_and_flux_beside_their_reference():
    "SDXL's and FLUX.1's shapes (the tiny ones here; -cpu and the real architectures are the same code at other sizes) run in both trainers and print their ratios"
    script = Path(__file__).resolve().parent.parent/'tools'/'benchmark.py'
    r = subprocess.run([sys.executable, script, '--models', 'sdxl-tiny,flux-tiny', '--steps', '6', '--prior', '2', '--no-fp32-check', '--no-like-for-like'],
                       capture_output=True, text=True, timeout=3600)  # a bound for a busy machine: the figures take what they take
    assert r.returncode == 0, r.stderr
    for model in ('sdxl-tiny', 'flux-tiny'):
        lines = [l for l in r.stdout.splitlines() if l.startswith(model)]
        assert [l.split()[1] for l in lines] == ['ours', 'reference'], r.stdout
        assert 'denoiser' in lines[0] and 'GFLOP a step' in lines[0]
    assert r.stdout.count('ours/ref') == 2

def test_benchmark_runs_the_newer_families_beside_their_reference():
    "SD 3.5's, Z-Image's, Qwen-Image's and FLUX.2 [klein]'s shapes (the tiny ones; -cpu is the same code at CPU sizes) run in both trainers, each encoding as its family does, and print their ratios"
    script = Path(__file__).resolve().parent.parent/'tools'/'benchmark.py'
    models = ('sd3-tiny', 'z-image-tiny', 'qwen-image-tiny', 'flux2-klein-tiny')
    r = subprocess.run([sys.executable, script, '--models', ','.join(models), '--steps', '4', '--warmup', '1', '--prior', '2', '--no-fp32-check', '--no-like-for-like'],
                       capture_output=True, text=True, timeout=3600)  # a bound for a busy machine: the figures take what they take
    assert r.returncode == 0, r.stderr
    for model in models:
        lines = [l for l in r.stdout.splitlines() if l.startswith(model + ' ')]
        assert [l.split()[1] for l in lines] == ['ours', 'reference'], r.stdout
        assert 'denoiser' in lines[0] and 'GFLOP a step' in lines[0]
    assert r.stdout.count('ours/ref') == len(models)

def test_benchmark_quality_mode_prints_learning_beside_the_reference():
    "--quality: both trainers on the same data, steps and learning rate; one evaluator measures each kept LoRA; the figures are printed, never asserted"
    script = Path(__file__).resolve().parent.parent/'tools'/'benchmark.py'
    r = subprocess.run([sys.executable, script, '--quality', '--models', 'tiny', '--steps', '20', '--every', '5', '--lr', '1e-3', '--prior', '4',
                        '--ours-args', '{"use_8bit_adam": false}'],
                       capture_output=True, text=True, timeout=3600)  # a bound for a busy machine: the figures take what they take
    assert r.returncode == 0, r.stderr
    labels = ('reference', 'ours snr 5', 'ours te', 'ours layers', 'ours lora+ 16', 'ours')
    rows = {next(k for k in labels if l.startswith(k + ' ')): l for l in r.stdout.splitlines() if l.startswith(('reference ', 'ours '))}
    assert set(rows) == set(labels), r.stdout
    figures = {k: l[len(k):].split() for k, l in rows.items()}  # precision, optimizer, held-out loss, class drift, job s, snapshots s, train s, time to quality, the curve
    assert all(len(f) >= 9 and ':' in f[-1] for f in figures.values()), r.stdout
    assert {f[1] for k, f in figures.items() if k != 'reference'} == {'AdamW'}  # --ours-args reached each of our runs (8-bit AdamW otherwise)
    assert all(float(f[4]) >= float(f[6]) and (k == 'reference' or float(f[4]) > float(f[6]) and float(f[5]) > 0) for k, f in figures.items()), r.stdout  # the snapshots' time (our scoring) is off the training clock
    assert "target: ours reaches the reference's final held-out loss" in r.stdout

def test_benchmark_edit_quality_mode_prints_an_edit_learnt_beside_the_kontext_reference():
    "--edit-quality: our trainer and the Kontext example's loop on the same pairs; the held-out pairs' loss with each LoRA, own input and another's, is printed, never asserted"
    script = Path(__file__).resolve().parent.parent/'tools'/'benchmark.py'
    r = subprocess.run([sys.executable, script, '--edit-quality', '--models', 'kontext-tiny', '--steps', '10', '--lr', '1e-2'], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr
    rows = {l.split()[0]: l.split()[1:] for l in r.stdout.splitlines() if l.startswith(('base ', 'reference ', 'ours '))}
    assert set(rows) == {'base', 'reference', 'ours'} and all(len(f) == 4 for f in rows.values()), r.stdout  # held-out loss, of base, another input, job s
    assert float(rows['base'][1]) == 1.0 and all(float(f[0]) > 0 and float(f[2]) > 0 for f in rows.values()), r.stdout
    assert "8 pairs trained on ('make it colour': a photo from its grey version), 2 held out" in r.stdout and 'target: ours lowers' in r.stdout

def test_memory_table_weighs_the_released_denoisers_on_the_meta_device():
    "tools/memory_table.py builds each released denoiser from its configuration on the meta device: its parameter count is the size its makers state, and its weights shrink as base_quantization says"
    script = Path(__file__).resolve().parent.parent/'tools'/'memory_table.py'
    r = subprocess.run([sys.executable, script, '--json'], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    import json
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert {row['family'] for row in rows} == {'sd3', 'z-image', 'qwen-image', 'flux2-klein', 'flux2'}
    for row in rows:
        assert abs(row['params_b'] / row['stated_b'] - 1) < 0.12, row  # the released configuration, not a guess (SD 3.5 Medium's 2.24 B counts as its stated 2.5)
        assert row['bf16_gb'] > row['int8_gb'] > row['nf4_gb'] > row['lora_gb'] > 0, row
