"`cerebrium-ft check-dataset` on a folder holding each kind of bad file, run as a user would run it"
import hashlib, json, shutil
import numpy as np
import pytest
from PIL import Image
from cerebrium_ft.testing import make_subject_images

EXPECTED = {  # file -> the one finding it must give
    'truncated.png': 'corrupt', 'not-a-photo.jpg': 'unreadable', 'zero.jpg': 'empty', 'sideways.jpg': 'orientation',
    'cmyk.jpg': 'cmyk', 'sixteen-bit.png': '16-bit', 'animated.gif': 'format', 'photo-copy.jpg': 'duplicate', 'huge.png': 'bomb'}

@pytest.fixture
def bad_folder(tmp_path):
    "8 good photos, and one file of each kind of problem, each made from a photo of its own"
    src = tmp_path/'src'
    photos = make_subject_images(src, n=14)
    d = tmp_path/'photos'; d.mkdir()
    for p in photos[:8]: shutil.copy(p, d/p.name)
    (d/'truncated.png').write_bytes(_png_bytes(photos[8])[:20_000])
    (d/'not-a-photo.jpg').write_text('these are my notes, not a photo\n')
    (d/'zero.jpg').write_bytes(b'')
    exif = Image.Exif(); exif[0x0112] = 6
    Image.open(photos[9]).transpose(Image.Transpose.ROTATE_90).save(d/'sideways.jpg', exif=exif)
    Image.open(photos[10]).convert('CMYK').save(d/'cmyk.jpg')
    Image.fromarray(np.asarray(Image.open(photos[11]).convert('L'), dtype=np.uint16) * 257).save(d/'sixteen-bit.png')
    Image.open(photos[12]).convert('P').save(d/'animated.gif')
    shutil.copy(photos[13], d/'photo.jpg'); shutil.copy(photos[13], d/'photo-copy.jpg')
    Image.new('1', (10_000, 10_000)).save(d/'huge.png')  # 100 megapixels in a small file
    assert (d/'huge.png').stat().st_size < 2_000_000
    return d

def _png_bytes(p):
    im = Image.open(p); out = p.with_suffix('.png'); im.save(out); return out.read_bytes()

def _digest(folder): return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

def test_one_finding_per_problem_and_exit_1(bad_folder, cli):
    r = cli('check-dataset', bad_folder, '--json')
    assert r.returncode == 1, r.stderr
    assert 'Traceback' not in r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert sorted((f['file'], f['code']) for f in report['findings']) == sorted(EXPECTED.items())
    assert all(f['fix'] for f in report['findings'])
    assert report['ok'] is False

def test_table_names_every_bad_file(bad_folder, cli):
    r = cli('check-dataset', bad_folder)
    assert r.returncode == 1 and 'Traceback' not in r.stdout + r.stderr
    assert 'WHAT TO DO' in r.stdout
    for name in EXPECTED: assert name in r.stdout

def test_fix_writes_a_folder_that_passes(bad_folder, tmp_path, cli):
    before = _digest(bad_folder)
    out = tmp_path/'clean'
    r = cli('check-dataset', bad_folder, '--fix', out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _digest(bad_folder) == before, "the source folder was changed"
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(['animated.png', 'cmyk.png', 'photo.png', 'sideways.png', 'sixteen-bit.png'] + [f"robot_{i:02d}.png" for i in range(8)])
    for p in out.iterdir():
        with Image.open(p) as im: assert (im.size, im.mode, len(im.getexif())) == ((512, 512), 'RGB', 0)
    again = cli('check-dataset', out, '--json')
    assert again.returncode == 0
    assert json.loads(again.stdout)['findings'] == []
    assert cli('check-dataset', bad_folder, '--fix', out).returncode == 2, "an existing non-empty folder must not be written into"

def test_sideways_photo_comes_out_upright(bad_folder, tmp_path, cli):
    cli('check-dataset', bad_folder, '--fix', tmp_path/'clean')
    got = np.asarray(Image.open(tmp_path/'clean'/'sideways.png'), dtype=float)
    want = np.asarray(Image.open(tmp_path/'src'/'robot_09.jpg').convert('RGB'), dtype=float)
    assert np.abs(got - want).mean() < 8

def test_style_mode_and_manifest(tmp_path, cli):
    photos = make_subject_images(tmp_path/'p', n=10)
    manifest = tmp_path/'data.json'
    manifest.write_text(json.dumps([{"path": f"p/{p.name}", "caption": "a photo of sks robot"} for p in photos] + ["p/missing.jpg"]))
    r = cli('check-dataset', manifest, '--mode', 'style', '--json')
    report = json.loads(r.stdout)
    assert r.returncode == 1
    assert [(f['file'], f['code']) for f in report['findings'] if f['severity'] == 'error'] == [('p/missing.jpg', 'missing')]
    assert {f['code'] for f in report['findings']} <= {'missing', 'colour', 'caption'}  # random backgrounds are no consistent style
    assert [f['severity'] for f in report['findings'] if f['code'] == 'caption'] == ['info']  # one caption for all ten: said, not an error
    assert report['images'][0]['caption'] == 'a photo of sks robot'

@pytest.mark.parametrize('args,status,message', [
    (['--mode', 'portrait'], 2, "--mode must be 'object' or 'style'"),
    (['--size', 'big'], 2, "invalid int value"),
])
def test_bad_arguments(tmp_path, cli, args, status, message):
    make_subject_images(tmp_path/'p', n=2, size=64)
    r = cli('check-dataset', tmp_path/'p', *args)
    assert r.returncode == status and message in r.stderr and 'Traceback' not in r.stderr

def test_missing_path(tmp_path, cli):
    r = cli('check-dataset', tmp_path/'nowhere')
    assert r.returncode == 1 and 'does not exist' in r.stdout and 'Traceback' not in r.stderr

def test_captions_against_the_trigger_word_and_the_models_text_encoder(tmp_path, cli, tiny_model):
    "--trigger-word says which captions lack it; --model counts each caption's tokens with the model's own tokenizer (CLIP reads 77)"
    photos = make_subject_images(tmp_path/'p', n=10, size=64)
    for k, p in enumerate(photos): p.with_suffix('.txt').write_text(f"a photo of sks robot, view {k}")
    photos[0].with_suffix('.txt').write_text('a photo of a robot on a beach')
    photos[1].with_suffix('.txt').write_text('a photo of sks robot ' + 'in deep snow ' * 30)
    r = cli('check-dataset', tmp_path/'p', '--model', tiny_model, '--trigger-word', 'sks', '--json')
    found = {(f['file'], f['severity'], f['message'].split(':')[0].split(' tokens')[0]) for f in json.loads(r.stdout)['findings'] if f['code'] == 'caption'}
    assert r.returncode == 0 and {(photos[0].name, 'info', "its caption does not name the trigger word 'sks'")} <= found, found
    assert any(f == photos[1].name and s == 'warning' and m.startswith('its caption is') for f, s, m in found), found
    assert len(found) == 2, found  # the other eight say nothing

def test_buckets_take_the_aspect_ratios_a_square_crop_would_cut(tmp_path, cli):
    "Portrait and landscape phone photos: warned of with square crops; with --enable-bucket no aspect finding, and --fix writes each at its bucket's size, which passes"
    photos = make_subject_images(tmp_path/'src', n=10, size=768)
    d = tmp_path/'photos'; d.mkdir()
    for k, p in enumerate(photos):  # 3:4 portraits, 4:3 landscapes, squares
        with Image.open(p) as im: (im.crop((96, 0, 672, 768)) if k < 4 else im.crop((0, 96, 768, 672)) if k < 7 else im.copy()).save(d/p.name, quality=95)
    wide = make_subject_images(tmp_path/'w', n=1, size=1024, seed=5)[0]
    with Image.open(wide) as im: im.crop((0, 256, 1024, 640)).save(d/'banner.jpg', quality=95)  # 1024x384: 2.67:1
    square = json.loads(cli('check-dataset', d, '--json').stdout)
    assert sorted(f['file'] for f in square['findings'] if f['code'] == 'aspect') == ['banner.jpg']  # 4:3 loses 25%: under the warning's 29%
    assert 'enable_bucket' in next(f['fix'] for f in square['findings'] if f['code'] == 'aspect')
    r = cli('check-dataset', d, '--enable-bucket', '--json')
    assert r.returncode == 0 and not [f for f in json.loads(r.stdout)['findings'] if f['code'] == 'aspect'], r.stdout
    r = cli('check-dataset', d, '--enable-bucket', '--fix', tmp_path/'fixed')
    assert r.returncode == 0, r.stdout + r.stderr
    sizes = {p.name: Image.open(p).size for p in (tmp_path/'fixed').glob('*.png')}
    assert sizes['robot_00.png'] == (448, 576) and sizes['robot_05.png'] == (576, 448) and sizes['robot_08.png'] == (512, 512) and sizes['banner.png'] == (768, 320)
    again = json.loads(cli('check-dataset', tmp_path/'fixed', '--enable-bucket', '--json').stdout)
    assert again['findings'] == [] and again['ok']

def test_a_model_out_of_reach_and_a_folder_that_is_no_model(tmp_path, cli):
    "--model whose configuration the Hub cannot give (offline here) ends with status 1, naming --size; a folder that is no pipeline is a usage error, 2"
    import os
    make_subject_images(tmp_path/'p', n=10, size=64)
    r = cli('check-dataset', tmp_path/'p', '--model', 'someone/some-model', env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert r.returncode == 1 and 'cannot reach the Hugging Face Hub' in r.stderr and 'give --size to check without it' in r.stderr, r.stderr
    r = cli('check-dataset', tmp_path/'p', '--model', tmp_path/'p')
    assert r.returncode == 2 and 'has no model_index.json: it is not a diffusers pipeline' in r.stderr, r.stderr
