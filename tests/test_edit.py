"""Edit LoRA: FLUX.1 Kontext, FLUX.2 and Qwen-Image-Edit trained on (input, edited) pairs, a control/ folder of inputs beside the edited images, as a user trains it:
the pairs checked, the inputs conditioning every step (and, for Qwen-Image-Edit, every prompt), validation as input | before | after, the LoRA loaded in the edit pipeline, `generate --image`"""
import json, shutil
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from cerebrium_ft import train as T
from cerebrium_ft.families import FAMILIES, load_parts, model_family
from cerebrium_ft.results import load_pipeline
from cerebrium_ft.testing import build_tiny_pipeline, make_subject_images
from conftest import run_cli
from test_train import col, manifest, rows, spec

EDIT = 'make it colour'

@pytest.fixture(scope='module')
def pairs(tmp_path_factory):
    "Ten pairs of a synthetic edit: the input a grey photo (control/, as a PNG of the same name), the edited image its colour original"
    d = tmp_path_factory.mktemp('pairs')/'colour'
    make_subject_images(d, n=10, size=64)
    (d/'control').mkdir()
    for p in sorted(d.glob('*.jpg')): Image.open(p).convert('L').convert('RGB').save(d/'control'/f"{p.stem}.png")
    return d

@pytest.fixture(scope='module')
def kontext(tmp_path_factory): return str(build_tiny_pipeline(tmp_path_factory.mktemp('k')/'kontext', family='kontext'))

def heldout_losses(model, pairs, out, names, inputs_of, seeds=8):
    "The denoising loss of pairs `names` (each edited image with the input `inputs_of(name)` gives), over `seeds` noise draws: the base model's, then with the run's LoRA"
    family = FAMILIES['kontext']; m = load_parts(model, 'main', family); net, vae = m['transformer'], m['vae']
    pix = lambda paths: torch.stack(T.load_pixels(paths, 64)[0])
    with torch.no_grad():
        enc = lambda paths: (vae.encode(pix(paths)).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        latents, control = enc([pairs/n for n in names]), enc([inputs_of(n) for n in names])
        cond = {k: v.expand(len(names), *v.shape[1:]) for k, v in family.encode_text(m, [EDIT], 'cpu', torch.float32).items()}
        loss = lambda c: np.mean([T.denoising_loss(net, m['noise_scheduler'], latents, dict(cond, control=c), torch.Generator().manual_seed(k), family=family)[0].item()
                                  for k in range(seeds)])
        base = loss(control)
        net.load_lora_adapter(str(out/'checkpoints/final/attn_procs'), weight_name='pytorch_lora_weights.safetensors', prefix='transformer')
        return base, loss(control)

def edits_as_trained(out, model, pipeline_cls, **edit_args):
    "`load_pipeline` gives `pipeline_cls` with the LoRA, which changes its edit of an input; the kohya file, through diffusers' converter, edits the same. The input, back"
    grey = Image.open(next((Path(edit_args.pop('pairs'))/'control').glob('*.png'))).convert('RGB')
    image = [grey] if edit_args.pop('as_list', False) else grey
    edit = lambda p: np.asarray(p(prompt=EDIT, image=image, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0), **edit_args).images[0], dtype=float)
    pipe = load_pipeline(out, device='cpu')
    assert type(pipe) is pipeline_cls and pipe.get_active_adapters()
    plain = model_family(model).family.pretrained_pipeline(model); plain.set_progress_bar_config(disable=True)  # Qwen-Image-Edit's processor without torchvision
    plain.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    tuned = edit(pipe)
    assert np.abs(tuned - edit(plain)).mean() > 1.0
    plain.load_lora_weights(str(out), weight_name='lora_kohya.safetensors')
    assert np.abs(tuned - edit(plain)).max() <= 1.0
    return grey

@pytest.fixture(scope='module')
def trained(kontext, pairs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('run')
    out = T.train(spec(kontext, pairs, training_prompt=EDIT, training_args=dict(max_train_steps=80, learning_rate=1e-2, holdout_images=2, num_validation_images=1,
                                                                                 validation_epochs=10, mixed_precision='no')), tmp/'run', progress=False)
    return out

def test_kontext_trains_on_pairs_and_the_heldout_pairs_loss_falls(trained, kontext, pairs):
    "Trained on the pairs, the held-out pairs' loss (each edited image given its own input) falls"
    m = manifest(trained)
    assert m['base_model']['family'] == 'kontext' and all(r['loss'] == r['loss'] for r in rows(trained))
    log = (trained/'logs.txt').read_text()
    assert "edit pairs: FLUX.1 Kontext trains on 10 images, each with its input image from control/" in log
    held = [n for n in log.split('held out of training to score checkpoints on: ')[1].split(' (')[0].split(', ')]
    base, tuned = heldout_losses(kontext, pairs, trained, held, lambda n: pairs/'control'/f"{n.rsplit('.', 1)[0]}.png")
    assert tuned < base * 0.95, (base, tuned)

def test_every_step_and_score_reads_its_pairs_input(kontext, pairs, tmp_path, monkeypatch):
    "Every denoiser call, training steps, scoring and mirror images included, gets its examples' inputs beside their noisy latents, at their size"
    seen, predict = [], T.predict
    def spy(fam, net, noisy, t, cond):
        seen.append((torch.is_grad_enabled(), cond.get('control') is not None and cond['control'].shape == noisy.shape))
        return predict(fam, net, noisy, t, cond)
    monkeypatch.setattr(T, 'predict', spy)
    T.train(spec(kontext, pairs, training_prompt=EDIT, training_args=dict(max_train_steps=4, random_flip=True, mixed_precision='no')), tmp_path/'run', progress=False)
    assert sum(g for g, _ in seen) == 4 and len(seen) > 4 and all(ok for _, ok in seen), seen
def test_validation_shows_input_before_and_after(trained, pairs):
    "Each validation row: the input (a held-out pair's), the base model's edit of it (made once), then the LoRA's"
    grid = Image.open(trained/'validation/epoch_0010/grid.png')
    assert grid.size == (3 * 64, 64)
    before = trained/'validation/before_00.png'
    assert before.is_file() and Image.open(before).text['rows'] == 'the base model, no LoRA'
    inp = np.asarray(grid.crop((0, 0, 64, 64)), dtype=float)
    assert np.ptp(inp.reshape(-1, 3), axis=0).max() > 0 and np.abs(inp[..., 0] - inp[..., 1]).max() <= 2  # the grey input
    assert Image.open(trained/'validation/epoch_0010/00.png').text['input'].endswith('.png')

def test_an_edit_lora_loads_in_the_kontext_pipeline_and_generate_edits_an_image(trained, kontext, pairs, tmp_path):
    "load_pipeline gives FluxKontextPipeline with the LoRA, which changes the edit; its kohya file, through diffusers' converter, edits the same; generate --image edits a photo"
    from diffusers import FluxKontextPipeline
    grey = edits_as_trained(trained, kontext, FluxKontextPipeline, pairs=pairs, max_area=64 * 64, _auto_resize=False)
    photo = tmp_path/'photo.png'; grey.resize((96, 64)).save(photo)  # a wider photo: edited in its own shape at the resolution it trained at (64 px)
    r = run_cli('generate', trained, EDIT, '--image', photo, '-n', '1', '--steps', '2', '--device', 'cpu', '--output', tmp_path/'edit.png', '--json')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['image'] == [str(photo)] and Image.open(tmp_path/'edit.png').size == (64, 48)
    r = run_cli('generate', trained, EDIT, '--device', 'cpu', '--output', tmp_path/'none.png')
    assert r.returncode == 2 and "FLUX.1 Kontext edits an image with this LoRA: give the image to edit with --image PATH" in r.stderr, r.stderr
    r = run_cli('generate', trained, EDIT, '--image', tmp_path/'missing.png', '--device', 'cpu', '--output', tmp_path/'none.png')
    assert r.returncode == 2 and f"--image {tmp_path/'missing.png'}: not an image that can be read" in r.stderr, r.stderr
    assert not (tmp_path/'none.png').exists()

def test_an_edit_model_refuses_a_dataset_without_pairs_and_prior_preservation(kontext, tmp_path):
    "Images without their inputs are refused with the check's error, and class images (no pairs) with a message, before anything is written"
    lone = tmp_path/'lone'; make_subject_images(lone, n=10, size=64)
    with pytest.raises(T.TrainingError, match="(?s)the dataset has errors.*an edit model trains on \\(input, edited\\)"):
        T.train(spec(kontext, lone, training_prompt=EDIT), tmp_path/'refused')
    with pytest.raises(T.TrainingError, match="prior preservation: FLUX.1 Kontext trains on \\(input, edited\\) pairs"):
        T.train(spec(kontext, lone, training_prompt=EDIT, prior_class_prompt='a photo of a robot', num_prior_class_images=2), tmp_path/'refused')
    with pytest.raises(T.TrainingError, match="validation_images are an edit LoRA's inputs to edit, and Stable Diffusion 1.x trains on this dataset's images alone"):
        T.train(spec(str(build_tiny_pipeline(tmp_path/'sd')), lone, training_args=dict(validation_images=['robot_00.jpg'])), tmp_path/'refused')
    assert not (tmp_path/'refused').exists()

def test_pairs_train_through_the_service_and_bad_pairs_are_refused(tmp_path, pairs):
    """train-diffuser uploads each input with its image, and the inputs validation_images names (a photo of the user's, its path replaced in the job's spec by the
    upload's); the job trains on the pairs, edits that photo at validation, and its zip loads in the Kontext pipeline. Inputs that name no image, an image without
    its input, validation_images without their upload or not an image are refused with nothing stored"""
    import requests
    from diffusers import FluxKontextPipeline
    from test_service import Server, submit
    model = build_tiny_pipeline(tmp_path/'models'/'kontext', family='kontext')
    s = Server(tmp_path/'data', model_dir=tmp_path/'models').start()
    try:
        s.key = next(w for w in s.output().split() if w.startswith('cft_'))
        photo = tmp_path/'mine'/'photo.png'; photo.parent.mkdir(); Image.open(pairs/'control'/'robot_03.png').resize((80, 64)).save(photo)
        r = submit(s, model, pairs, steps=6, follow=True, extra=dict(mixed_precision='no', validation_images=[str(photo)], validation_inference_steps=1))
        assert r.returncode == 0, r.stderr
        j = json.loads(r.stdout); assert j['status'] == 'succeeded', j
        jd = s.data_dir/'jobs'/j['id']
        assert json.loads((jd/'spec.json').read_text())['training_args']['validation_images'] == ['.validation/valid_000.png']  # never the client's path
        assert [Image.open(p).text['input'] for p in jd.glob('results/validation/epoch_*/00.png')] == ['valid_000.png']  # the photo, edited
        inputs = sorted(p.name for p in (s.data_dir/'jobs'/j['id']/'dataset'/'control').iterdir())
        assert len(inputs) == 10 and all(n.startswith('image_') and n.endswith('.png') for n in inputs), inputs  # under the saved images' names
        assert run_cli('download-model', j['id'], s.key, '--output', tmp_path/'k.zip', '--url', s.url).returncode == 0
        assert type(load_pipeline(tmp_path/'k.zip', model=str(model), device='cpu')) is FluxKontextPipeline
        spec = json.dumps(dict(name='edit', hf_model_path=str(model), training_prompt=EDIT, training_args=dict(resolution=64)))
        photos = sorted(pairs.glob('*.jpg'))
        def post(controls, index):
            files = [('images', (p.name, p.read_bytes())) for p in photos] + [('controls', (c.name, c.read_bytes())) for c in controls]
            return requests.post(f"{s.url}/v1/jobs", data={'spec': spec, **({'control_index': index} if index is not None else {})}, files=files,
                                 headers={'Authorization': f"Bearer {s.key}"})
        inputs = [pairs/'control'/f"{p.stem}.png" for p in photos]
        for index in (None, json.dumps([[i, 0] for i in range(9)]), json.dumps([[i, 0] for i in range(9)] + [[10, 0]]), json.dumps([[0, 0]] * 10)):
            r = post(inputs, index)
            assert r.status_code == 400 and 'control_index must be a JSON list of 10 distinct [image index, input number] pairs' in r.text, (index, r.text)
        r = post(inputs[:9], json.dumps([[i, 0] for i in range(9)]))  # the last image without its input
        assert r.status_code == 400 and any(f['code'] == 'control-missing' for f in r.json()['detail']['findings']), r.text
        index = json.dumps([[i, 0] for i in range(10)])
        spec = json.dumps(dict(name='edit', hf_model_path=str(model), training_prompt=EDIT, training_args=dict(resolution=64, validation_images=['/home/me/car.png'])))
        r = post(inputs, index)  # named, not uploaded
        assert r.status_code == 400 and 'validation_images: the spec names 1 input images to edit and 0 were uploaded' in r.text, r.text
        r = requests.post(f"{s.url}/v1/jobs", data={'spec': spec, 'control_index': index}, headers={'Authorization': f"Bearer {s.key}"},
                          files=[('images', (p.name, p.read_bytes())) for p in photos] + [('controls', (c.name, c.read_bytes())) for c in inputs] + [('validation_images', ('car.png', b'not a png'))])
        assert r.status_code == 400 and 'validation_images: valid_000.png is not an image that can be read' in r.text, r.text
        assert not any((s.data_dir/'uploads').iterdir()) and len(list((s.data_dir/'jobs').iterdir())) == 1  # the one job that trained
    finally: s.stop()

def test_check_dataset_with_an_edit_model_checks_the_pairs(kontext, pairs, tmp_path):
    "check-dataset --model KONTEXT checks each image's input: the pairs pass; without inputs it fails saying where they go, and --fix writes the pairs"
    r = run_cli('check-dataset', pairs, '--model', kontext, '--json')
    assert r.returncode == 0, r.stdout
    lone = tmp_path/'lone'; make_subject_images(lone, n=10, size=64)
    r = run_cli('check-dataset', lone, '--model', kontext, '--json')
    assert r.returncode == 1 and [f['code'] for f in json.loads(r.stdout)['findings'] if f['severity'] == 'error'] == ['no-controls'], r.stdout
    r = run_cli('check-dataset', pairs, '--model', kontext, '--fix', tmp_path/'fixed', '--json')
    assert r.returncode == 0 and len(list((tmp_path/'fixed'/'control').glob('*.png'))) == 10, r.stdout

def test_flux2_learns_an_edit_from_reference_images(pairs, tmp_path):
    "FLUX.2 [klein] given pairs trains an edit LoRA on its reference images: the inputs in every step, validation as input | before | after, the LoRA edits in Flux2KleinPipeline (its kohya file the same), generate asks for --image"
    from diffusers import Flux2KleinPipeline
    model = str(build_tiny_pipeline(tmp_path/'klein', family='flux2-klein'))
    out = T.train(spec(model, pairs, training_prompt=EDIT, training_args=dict(max_train_steps=40, learning_rate=1e-2, holdout_images=1, num_validation_images=1,
                                                                              validation_epochs=10, mixed_precision='no')), tmp_path/'run', progress=False)
    assert manifest(out)['edit_inputs'] == 1 and col(out, 'loss')[-1] == col(out, 'loss')[-1]
    assert "edit pairs: FLUX.2 [klein] trains on 10 images, each with its input image from control/" in (out/'logs.txt').read_text()
    assert Image.open(out/'validation/epoch_0008/grid.png').size == (3 * 64, 64)  # 9 images train, 5 steps an epoch: the last validation's
    edits_as_trained(out, model, Flux2KleinPipeline, pairs=pairs, as_list=True)  # its reference images: a list
    r = run_cli('generate', out, EDIT, '--device', 'cpu', '--output', tmp_path/'none.png')
    assert r.returncode == 2 and "FLUX.2 [klein] edits an image with this LoRA: give the image to edit with --image PATH" in r.stderr, r.stderr

@pytest.mark.parametrize('family', ['kontext', 'flux2-klein', 'qwen-image-edit'])
def test_edit_pairs_train_in_bf16_as_a_cpu_with_amx_picks(pairs, tmp_path, monkeypatch, family):
    "Pairs under bf16 autocast (what 'auto' picks on AMX CPUs; forced here on every CPU), with gradient checkpointing: the inputs reach every step in the run's precision, the losses stay finite, validation edits its input"
    from cerebrium_ft import speed
    monkeypatch.setattr(speed, 'cpu_has_bf16', lambda: True)
    seen, predict = [], T.predict
    def spy(fam, net, noisy, t, cond):
        seen.append(cond['control'].shape == noisy.shape)
        return predict(fam, net, noisy, t, cond)
    monkeypatch.setattr(T, 'predict', spy)
    model = str(build_tiny_pipeline(tmp_path/family, family=family))
    out = T.train(spec(model, pairs, training_prompt=EDIT, training_args=dict(max_train_steps=4, mixed_precision='bf16', num_validation_images=1, validation_epochs=1, validation_inference_steps=2,
                                                                              gradient_checkpointing=True)), tmp_path/'run', progress=False)
    m = manifest(out)
    assert (m['precision'], m['edit_inputs']) == ('bf16', 1) and all(np.isfinite(col(out, 'loss'))) and seen and all(seen)
    assert Image.open(out/'validation/epoch_0001/grid.png').size == (3 * 64, 64)

def test_qwen_image_edit_reads_each_pairs_input_with_its_prompt_and_learns_the_edit(pairs, tmp_path, monkeypatch):
    """Qwen-Image-Edit at its defaults but for the run's length: each prompt is read by its language model with its own pair's input (the validation prompt and its
    negative with the validation input), the held-out pairs' score falls below the base model's, validation shows input | before | after, the LoRA (its kohya
    file the same) edits in QwenImageEditPipeline, and generate --image edits a photo"""
    from diffusers import QwenImageEditPipeline
    read, encode = [], T.encode_text
    def spy(family, m, prompts, *a, images=None, **kw):
        read.append((list(prompts), images))
        return encode(family, m, prompts, *a, images=images, **kw)
    monkeypatch.setattr(T, 'encode_text', spy)
    model = str(build_tiny_pipeline(tmp_path/'qie', family='qwen-image-edit'))
    out = T.train(spec(model, pairs, training_prompt=EDIT, training_args=dict(max_train_steps=40, learning_rate=1e-2, num_validation_images=1, validation_epochs=100,
                                                                              validation_inference_steps=2, mixed_precision='no')), tmp_path/'run', progress=False)
    m = manifest(out)
    assert (m['base_model']['family'], m['edit_inputs']) == ('qwen-image-edit', 1) and m['best']['score'] < 0.95 * m['heldout']['base_model_score'], m['best']
    prompts, images = read[0]
    assert len(read) == 1 and len(prompts) == len(images) == 10 + 2 and prompts[-2:] == [EDIT, ''], prompts
    grey = lambda im: np.asarray(im, dtype=int); controls = sorted((pairs/'control').glob('*.png'))
    own = {T.fitted_image(c, (64, 64)).tobytes() for c in controls}
    assert {row[0].tobytes() for row in images[:10]} == own  # each pair's own input, every one
    assert all(np.ptp(grey(row[0]), axis=-1).max() == 0 for row in images) and images[-1][0].tobytes() == images[-2][0].tobytes()
    log = (out/'logs.txt').read_text()
    assert "Qwen-Image-Edit reads each prompt with its pair's input images: 10 prompts encoded, each image's own" in log
    assert Image.open(out/'validation/epoch_0008/grid.png').size == (3 * 64, 64)  # 10 images, 5 steps an epoch
    edits_as_trained(out, model, QwenImageEditPipeline, pairs=pairs)
    photo = tmp_path/'photo.png'; Image.open(controls[0]).resize((96, 64)).save(photo)
    r = run_cli('generate', out, EDIT, '--image', photo, '-n', '2', '--steps', '1', '--device', 'cpu', '--output', tmp_path/'edit.png')
    assert r.returncode == 0 and Image.open(tmp_path/'edit.png').size == (2 * 64, 48), r.stderr

def test_qwen_image_edit_plus_trains_on_two_inputs_each_read_as_a_picture(pairs, tmp_path, monkeypatch):
    "Qwen-Image-Edit-2511 with two inputs per pair (control/, control_2/): both reach every step and the language model, a third --image is refused, two edit"
    two = tmp_path/'two'; shutil.copytree(pairs, two)
    (two/'control_2').mkdir()
    for c in (two/'control').glob('*.png'): Image.open(c).transpose(Image.FLIP_LEFT_RIGHT).save(two/'control_2'/c.name)
    seen, predict, read, encode = [], T.predict, [], T.encode_text
    def spy(fam, net, noisy, t, cond):
        seen.append(cond['control'].shape == cond['control_2'].shape == noisy.shape)
        return predict(fam, net, noisy, t, cond)
    monkeypatch.setattr(T, 'predict', spy)
    monkeypatch.setattr(T, 'encode_text', lambda family, m, prompts, *a, images=None, **kw: read.append(images) or encode(family, m, prompts, *a, images=images, **kw))
    model = str(build_tiny_pipeline(tmp_path/'qiep', family='qwen-image-edit-plus'))
    out = T.train(spec(model, two, training_prompt=EDIT, training_args=dict(max_train_steps=4, num_validation_images=0, mixed_precision='no')),
                  tmp_path/'run', progress=False)
    assert manifest(out)['edit_inputs'] == 2 and seen and all(seen) and all(len(row) == 2 for row in read[0])
    assert "each with its input images from control/, control_2/" in (out/'logs.txt').read_text()
    a, b = sorted((two/'control').glob('*.png'))[0], sorted((two/'control_2').glob('*.png'))[0]
    r = run_cli('generate', out, EDIT, '--image', a, b, a, b, '--device', 'cpu', '--output', tmp_path/'none.png')
    assert r.returncode == 2 and "--image: Qwen-Image-Edit-2509/2511 takes 3 input images, got 4" in r.stderr, r.stderr
    r = run_cli('generate', out, EDIT, '--image', a, b, '-n', '1', '--steps', '1', '--device', 'cpu', '--output', tmp_path/'edit.png', '--json')
    assert r.returncode == 0 and json.loads(r.stdout)['image'] == [str(a), str(b)], r.stderr
