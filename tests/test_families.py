"""The families of 2025-26, each trained end to end on its tiny pipeline as a user trains it: class images from its own pipeline, its loss
lowered, its results loaded in its own pipeline (changing what it draws) and its kohya file in the layout ComfyUI reads for it"""
import json
import numpy as np
import pytest
import torch
from safetensors import safe_open
from cerebrium_ft import train as T
from cerebrium_ft.families import FAMILIES
from cerebrium_ft.results import load_pipeline
from cerebrium_ft.testing import build_tiny_pipeline, make_subject_images
from test_train import col, loss_before_and_after, manifest, resumes_as_if_never_stopped, rows, spec

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('d')/'robot'
    make_subject_images(d, n=6, size=64)
    return d

def render(pipe, seed=0):
    return np.asarray(pipe(prompt='a photo of sks robot', num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(seed)).images[0], dtype=float)

# key: (the tiny builder's name, the pipeline class, kohya's name, learning rate, noise draws to measure the loss on, its text encoders' kohya prefixes,
#       whether diffusers' loader reads its kohya file: it reads the diffusion_model. layout of Z-Image and Qwen-Image and kohya's FLUX.2 one, and nothing of OneTrainer's SD3 one)
FAMILY_RUNS = {'sd3': ('sd3', 'StableDiffusion3Pipeline', 'sd3', 1e-2, 8, ('lora_te1_', 'lora_te2_'), False),
               'z-image': ('z-image', 'ZImagePipeline', 'z_image', 1e-2, 8, (), True),
               'qwen-image': ('qwen-image', 'QwenImagePipeline', 'qwen_image', 1e-2, 8, (), True),
               'flux2-klein': ('flux2-klein', 'Flux2KleinPipeline', 'flux2_klein', 1e-2, 8, (), True),
               'flux2': ('flux2', 'Flux2Pipeline', 'flux2', 1e-2, 8, (), True)}  # its tokenizer folder a Pixtral processor's, as released: all of it runs without torchvision

@pytest.mark.parametrize('key', list(FAMILY_RUNS))
def test_each_new_family_trains_with_prior_preservation_and_loads_in_its_pipeline(data, tmp_path, key):
    import diffusers
    tiny, pipeline, kohya_name, lr, seeds, te, diffusers_reads_kohya = FAMILY_RUNS[key]
    family, model = FAMILIES[key], str(build_tiny_pipeline(tmp_path/key, family=tiny))
    out = T.train(spec(model, data, prior_class_prompt='a photo of a robot', num_prior_class_images=2,
                       training_args=dict(max_train_steps=60, learning_rate=lr, num_validation_images=1, validation_epochs=10, mixed_precision='no',
                                          train_text_encoder=bool(te))),
                  tmp_path/'run', cache=tmp_path/'cache', progress=False)
    m = manifest(out)
    assert (m['base_model']['family'], m['base_model']['prediction'], m['class_images']) == (key, 'flow_matching', 2)
    assert m['lora']['targets'] == list(family.lora_targets) and (out/'validation/epoch_0010/00.png').is_file()
    assert all(float(r['prior_loss']) > 0 for r in rows(out)) and col(out, 'loss')[-1] == col(out, 'loss')[-1]  # finite to the end
    with safe_open(str(out/'lora_kohya.safetensors'), 'pt') as f:
        keys = list(f.keys())
        assert f.metadata()['ss_base_model_version'] == kohya_name
    denoiser = family.kohya_key(family.denoiser, 'X')[:-1]  # lora_transformer_, diffusion_model. where ComfyUI reads diffusers' names, lora_unet_ for FLUX.2's original ones
    assert all(k.startswith((denoiser, *te)) for k in keys) and any(k.startswith(denoiser) for k in keys), keys[:5]  # the transformer's, and the text encoders'
    assert all(any(k.startswith(p) for k in keys) for p in te)
    base, tuned = loss_before_and_after(model, key, data, out, seeds)
    assert tuned < base * 0.95, (base, tuned)
    pipe = load_pipeline(out, device='cpu')
    assert type(pipe) is getattr(diffusers, pipeline) and pipe.get_active_adapters()
    plain = family.pretrained_pipeline(model); plain.set_progress_bar_config(disable=True)
    assert type(plain) is type(pipe)
    plain.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    tuned_image = render(pipe)
    assert np.abs(tuned_image - render(plain)).mean() > 1.0  # the LoRA changes what it draws
    if diffusers_reads_kohya:  # the kohya file, through diffusers' converter, draws the same
        plain.load_lora_weights(str(out), weight_name='lora_kohya.safetensors')
        assert np.abs(tuned_image - render(plain)).max() <= 1.0

def test_weighting_scheme_draws_a_flow_matching_models_noise_levels(data, tmp_path, monkeypatch):
    "The family's own scheme by default (SD 3.5: logit_normal, as its diffusers example), the setting's when given, reaching every step's draw; refused for a DDPM family before anything is written"
    from cerebrium_ft.families.base import FlowMatching
    model, seen, noised = str(build_tiny_pipeline(tmp_path/'sd3', family='sd3')), [], FlowMatching.noised
    monkeypatch.setattr(FlowMatching, 'noised', lambda self, *a, **k: seen.append((a[4] if len(a) > 4 else k.get('sampling')).scheme) or noised(self, *a, **k))
    for scheme, want in [(None, 'logit_normal'), ('mode', 'mode')]:
        seen.clear()
        out = T.train(spec(model, data, training_args=dict(max_train_steps=2, mixed_precision='no', **({'weighting_scheme': scheme} if scheme else {}))),
                      tmp_path/f"run-{want}", progress=False)
        assert set(seen) == {want} and len(seen) >= 2, seen
        assert f"flow matching: noise levels drawn by weighting_scheme {want}" in (out/'logs.txt').read_text()
    sd1 = str(build_tiny_pipeline(tmp_path/'sd1'))
    with pytest.raises(T.TrainingError, match="weighting_scheme draws the noise levels of the flow-matching families; .* is Stable Diffusion 1.x, trained on DDPM's timesteps: leave weighting_scheme auto"):
        T.train(spec(sd1, data, training_args=dict(weighting_scheme='logit_normal')), tmp_path/'refused')
    assert not (tmp_path/'refused').exists()

def test_a_text_encoder_that_does_not_train_is_refused(data, tmp_path):
    "Z-Image's language model trains with no LoRA here (diffusers' example trains the transformer alone): train_text_encoder is refused before anything is written"
    model = str(build_tiny_pipeline(tmp_path/'zi', family='z-image'))
    with pytest.raises(T.TrainingError, match="train_text_encoder: Z-Image's text encoder does not train here .*: leave train_text_encoder off"):
        T.train(spec(model, data, training_args=dict(train_text_encoder=True)), tmp_path/'refused')
    assert not (tmp_path/'refused').exists()

@pytest.mark.parametrize('key', list(FAMILY_RUNS))
def test_each_new_family_stopped_after_a_checkpoint_resumes_as_if_never_stopped(data, tmp_path, monkeypatch, key):
    "Random crops, mirror images and the family's own noise levels: a run stopped after its checkpoint at step 3 ends with the losses and weights of one never stopped"
    model = str(build_tiny_pipeline(tmp_path/key, family=FAMILY_RUNS[key][0]))
    s = spec(model, data, training_args=dict(max_train_steps=6, checkpointing_steps=3, random_flip=True, center_crop=False, mixed_precision='no', validation_epochs=1000))
    resumes_as_if_never_stopped(s, tmp_path, monkeypatch)

@pytest.mark.parametrize('key', list(FAMILY_RUNS))
def test_each_new_family_trains_in_bf16_as_a_cpu_with_amx_picks(data, tmp_path, monkeypatch, key):
    "The step, scoring and validation under bf16 autocast (what 'auto' picks on AMX CPUs; forced here, so CPUs without it walk the same path), with gradient checkpointing: the run records it, its losses stay finite, its LoRA (fp32 over bf16 weights) loads and changes what it draws"
    from cerebrium_ft import speed
    monkeypatch.setattr(speed, 'cpu_has_bf16', lambda: True)  # bf16 on every CPU (emulated without AVX512-BF16/AMX)
    model = str(build_tiny_pipeline(tmp_path/key, family=FAMILY_RUNS[key][0]))
    out = T.train(spec(model, data, training_args=dict(max_train_steps=4, learning_rate=1e-2, mixed_precision='bf16', num_validation_images=1, validation_epochs=1,
                                                      gradient_checkpointing=True)), tmp_path/'run', progress=False)
    m = manifest(out)
    assert (m['precision'], m['base_model']['family'], m['steps']) == ('bf16', key, 4)
    assert all(np.isfinite(col(out, 'loss'))) and np.isfinite(m['best']['score'])
    pipe = load_pipeline(out, device='cpu')
    assert pipe.get_active_adapters()
