"The offline tiny pipeline: built by the CLI, loaded by diffusers' own `from_pretrained`, generating"
import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

def test_tiny_model_is_small_and_loads(tiny_model):
    size = sum(f.stat().st_size for f in tiny_model.rglob('*') if f.is_file())
    assert 3.5e6 <= size < 4.5e6, size  # the README's "4 MB"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert {type(m).__name__ for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer)} == {
        'UNet2DConditionModel', 'AutoencoderKL', 'CLIPTextModel', 'CLIPTokenizer'}

def test_tiny_model_generates(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    gen = lambda p: pipe(p, num_inference_steps=4, generator=torch.Generator().manual_seed(1)).images[0]
    a, b = gen("a photo of sks robot"), gen("a watercolour of a house")
    assert a.size == (64, 64)
    assert np.asarray(a).std() > 1
    assert not np.array_equal(np.asarray(a), np.asarray(b)), "the prompt must reach the UNet through cross-attention"

def test_demo_end_to_end(tmp_path, cli):
    r = cli('demo', '--workdir', tmp_path/'demo', '--steps', '10')
    assert r.returncode == 0, r.stdout + r.stderr
    assert '5/5 images' in r.stdout and 'Traceback' not in r.stderr
    assert Image.open(tmp_path/'demo'/'samples.png').size == (256, 128)
    assert (tmp_path/'demo'/'robot-lora'/'checkpoints/final/attn_procs/pytorch_lora_weights.safetensors').exists()
