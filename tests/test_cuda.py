"""The CUDA paths, on a GPU machine: mixed precision as 'auto' picks it, fp16 with its loss scaling, 8-bit Adam, QLoRA over a
bitsandbytes-quantized denoiser, gradient checkpointing, and results loaded and drawn on the GPU, for each family's tiny model.
CI has no GPU, so these skip there; `bash tools/cuda_check.sh` runs them (and the GPU benchmark) on one."""
import csv, json, math
from pathlib import Path
import numpy as np
import pytest
import torch

GPU = 'cuda'
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

from cerebrium_ft import train as T
from cerebrium_ft.config import JobSpec
from cerebrium_ft.results import load_pipeline
from cerebrium_ft.testing import build_tiny_pipeline, make_subject_images

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('d')/'robot'
    make_subject_images(d, n=6, size=64)
    return d

@pytest.fixture(scope='module')
def models(tmp_path_factory):
    "The tiny model of each family, built once"
    root, built = tmp_path_factory.mktemp('m'), {}
    def get(family):
        if family not in built: built[family] = str(build_tiny_pipeline(root/family, family=family))
        return built[family]
    return get

def spec(model, data, **ta):
    return JobSpec(name='robot', hf_model_path=model, dataset=str(data), training_prompt='a photo of sks robot', training_args=ta)

def manifest(out): return json.loads((Path(out)/'manifest.json').read_text())
def losses(out): return [float(r['loss']) for r in csv.DictReader(open(Path(out)/'metrics.csv'))]

def draws(pipe, seed=0) -> np.ndarray:
    im = pipe('a photo of sks robot', num_inference_steps=3, height=64, width=64, generator=torch.Generator(GPU).manual_seed(seed)).images[0]
    return np.asarray(im, dtype=float)

def lora_changes_the_gpu_pipeline(out):
    "The results load on the GPU in their family's pipeline, draw a finite image, and the LoRA changes it"
    pipe = load_pipeline(out, device=GPU)
    assert pipe.device.type == GPU and pipe.get_active_adapters()
    assert pipe.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)  # FLUX.1 overflows fp16
    tuned = draws(pipe)
    pipe.disable_lora()
    base = draws(pipe)
    assert np.isfinite(tuned).all() and np.abs(tuned - base).mean() > 0.5, np.abs(tuned - base).mean()

def test_the_default_settings_train_with_8bit_adam_in_the_gpus_precision(models, data, tmp_path):
    "What a user gets on a GPU with no settings at all: 'auto' precision (bf16 where the GPU has it), 8-bit AdamW, 30 epochs, validation images"
    out = T.train(spec(models('sd1'), data), tmp_path/'run', device=GPU, progress=False)
    m = manifest(out)
    assert m['precision'] == ('bf16' if torch.cuda.is_bf16_supported() else 'fp16')
    assert m['optimizer'] == 'AdamW8bit' and m['steps'] == 90  # 30 epochs of 3 batches of 2
    assert all(math.isfinite(l) for l in losses(out)) and (out/'validation/epoch_0030/00.png').is_file()
    lora_changes_the_gpu_pipeline(out)

@pytest.mark.parametrize('family, precision', [('sd1', 'fp16'), ('sd1', 'no'), ('sd2-v', 'fp16'), ('sdxl', 'fp16'), ('sdxl', 'bf16'), ('flux', 'bf16')])
def test_each_family_trains_in_each_precision_on_the_gpu(models, data, tmp_path, family, precision):
    "fp16 (autocast with loss scaling, the LoRA in fp32), bf16 and fp32, with 8-bit AdamW: finite losses that go down, and results that load on the GPU"
    out = T.train(spec(models(family), data, max_train_steps=30, learning_rate=1e-2, num_validation_images=1, validation_epochs=10,
                       mixed_precision=precision), tmp_path/'run', device=GPU, progress=False)
    m, ls = manifest(out), losses(out)
    assert (m['precision'], m['optimizer'], m['steps']) == (precision, 'AdamW8bit', 30)
    assert all(math.isfinite(l) for l in ls), ls
    lora_changes_the_gpu_pipeline(out)

@pytest.mark.parametrize('family, precision', [('sd1', 'fp16'), ('sdxl', 'bf16'), ('flux', 'bf16')])
def test_transformer_layers_text_encoder_lora_and_loraplus_train_on_the_gpu(models, data, tmp_path, family, precision):
    """The quality levers together in the GPU's precision with 8-bit AdamW: lora_layers 'transformer' (the feed-forward, the UNet's 1x1 or linear
    projections), the text encoders' LoRA on their MLPs too, LoRA+ at 4: finite losses, every layer named in the manifest, results that load and draw"""
    from cerebrium_ft.families import FAMILIES, TEXT_BLOCK_TARGETS
    out = T.train(spec(models(family), data, max_train_steps=20, learning_rate=1e-3, num_validation_images=1, validation_epochs=10, mixed_precision=precision,
                       lora_layers='transformer', train_text_encoder=True, loraplus_lr_ratio=4), tmp_path/'run', device=GPU, progress=False)
    m, ls = manifest(out), losses(out)
    assert (m['precision'], m['optimizer'], m['steps']) == (precision, 'AdamW8bit', 20)
    assert m['lora']['targets'] == list(FAMILIES[family].block_targets) and m['lora']['text_encoder_targets'] == list(TEXT_BLOCK_TARGETS)
    assert all(math.isfinite(l) for l in ls), ls
    lora_changes_the_gpu_pipeline(out)

@pytest.mark.parametrize('family, quantization', [('flux', 'nf4'), ('flux', '8bit'), ('sdxl', 'nf4'), ('sd1', 'nf4')])
def test_qlora_trains_over_a_quantized_base_and_loads_on_the_full_one(models, data, tmp_path, family, quantization, monkeypatch):
    """base_quantization: bitsandbytes' 4- or 8-bit layers carry the frozen denoiser, the LoRA trains over them (with gradient
    checkpointing), and its weights load into the unquantized pipeline"""
    import bitsandbytes as bnb
    from cerebrium_ft.families import FAMILIES, denoiser_of
    layers, load = {}, T.load_models
    def counting(*a, **k):  # the denoiser the run trains over: how many of its linear layers are bitsandbytes' quantized ones
        m = load(*a, **k); net = denoiser_of(FAMILIES[family], m)
        layers['quantized'] = sum(isinstance(x, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for x in net.modules())
        layers['plain'] = sum(type(x) is torch.nn.Linear for x in net.modules())
        return m
    monkeypatch.setattr(T, 'load_models', counting)
    out = T.train(spec(models(family), data, max_train_steps=20, learning_rate=1e-2, num_validation_images=1, validation_epochs=10,
                       base_quantization=quantization, gradient_checkpointing=True, mixed_precision='bf16'), tmp_path/'run', device=GPU, progress=False)
    assert layers['quantized'] > 0, layers
    m = manifest(out)
    assert m['job']['training_args']['base_quantization'] == quantization and m['steps'] == 20
    assert all(math.isfinite(l) for l in losses(out))
    lora_changes_the_gpu_pipeline(out)

def test_gradient_checkpointing_leaves_the_losses_as_they_were(models, data, tmp_path):
    "Recomputing the denoiser's activations in the backward pass is the same arithmetic: the same losses and LoRA, up to GPU reduction order"
    from safetensors.torch import load_file
    runs = [T.train(spec(models('sd1'), data, max_train_steps=10, learning_rate=1e-2, num_validation_images=0, mixed_precision='no',
                         use_8bit_adam=False, gradient_checkpointing=gc), tmp_path/f'run{gc}', device=GPU, progress=False) for gc in (False, True)]
    a, b = map(losses, runs)
    assert a[0] == pytest.approx(b[0], abs=1e-5) and np.allclose(a, b, atol=1e-3), (a, b)
    la, lb = (load_file(r/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors') for r in runs)
    ups = [k for k in la if 'lora_B' in k or 'lora.up' in k]  # zero at the start: all they hold is what training wrote
    # Adam moves a weight whose gradient is near zero by up to the learning rate either way, so the GPU's reduction order shows
    # there weight by weight: the whole learnt update is compared (measured 1.2e-2 for the largest single weight on an H200)
    gap = sum((la[k] - lb[k]).norm() ** 2 for k in ups).sqrt() / sum(la[k].norm() ** 2 for k in ups).sqrt()
    assert ups and gap < 0.05, gap
