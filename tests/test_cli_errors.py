"Every way a user can get a command wrong ends in one line that says what to do and a non-zero exit status: never a traceback"
import http.server, threading
import pytest
from conftest import run_cli

ERROR_PAGE = b"""<!DOCTYPE html>
<html>
<head><title>500 Internal Server Error</title></head>
<body>
<h1>Internal Server Error</h1>
<p>The server encountered an internal error and was unable to complete your request.</p>
<pre>Traceback (most recent call last):
  File "app.py", line 12
</pre>
</body>
</html>
"""

class Impostor(http.server.BaseHTTPRequestHandler):
    "Something on the port that is not the job service, or a job service that breaks off"
    paths = []
    def do_GET(self):
        Impostor.paths.append(self.path)
        if self.path == '/v1/jobs/j_page500':  # a proxy's error page, many lines of HTML
            self.send_response(500); self.send_header('Content-Type', 'text/html'); self.send_header('Content-Length', str(len(ERROR_PAGE)))
            self.end_headers(); self.wfile.write(ERROR_PAGE); return
        body, ctype, length = {'/v1/jobs/j_html': (b'<html>Please log in</html>', 'text/html', None),
                               '/v1/jobs/j_shape': (b'[1, 2, 3]', 'application/json', None),
                               '/v1/jobs/j_cut/results': (b'PK\x03\x04' + b'x' * 100, 'application/zip', 5000),
                               '/v1/jobs/j_page/results': (b'<html>oops</html>', 'text/html', None)}.get(self.path, (b'{}', 'application/json', None))
        self.send_response(200); self.send_header('Content-Type', ctype); self.send_header('Content-Length', str(length or len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass

@pytest.fixture(scope='module')
def impostor():
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Impostor)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()

def one_line(r, status, said):
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert said in r.stderr, r.stderr

@pytest.mark.parametrize('url,said', [('127.0.0.1:8642', 'did you mean http://127.0.0.1:8642?'), ('http://127.0.0.1:99999', 'Port out of range'),
                                      ('ftp://127.0.0.1', 'ftp:// is not served'), ('http://:8642', 'names no host'), ('not a url', 'must start with http://')])
def test_a_url_the_service_cannot_have(url, said):
    "A job service URL that cannot be valid is bad input: exit status 2, from --url and from CEREBRIUM_FT_URL alike"
    import os
    one_line(run_cli('get-most-recent-jobs', 'p_x', 'cft_a_b', '--url', url), 2, said)
    one_line(run_cli('get-most-recent-jobs', 'p_x', 'cft_a_b', env={**os.environ, 'CEREBRIUM_FT_URL': url}), 2, said)

def test_a_url_that_is_valid_but_answers_nothing_is_a_failure_not_bad_input():
    one_line(run_cli('get-most-recent-jobs', 'p_x', 'cft_a_b', '--url', 'http://127.0.0.1:9'), 1, 'cannot reach the job service at http://127.0.0.1:9')

def test_credentials_in_the_url_never_reach_a_message(impostor):
    "A user name and password in --url are sent, never printed: not when nothing answers, not in a server's error, not for a URL that cannot be valid"
    host = impostor.split('//')[1]
    for url, status in [('http://me:s3cret@127.0.0.1:9', 1), (f'http://me:s3cret@{host}', 1), ('ftp://me:s3cret@127.0.0.1', 2)]:
        r = run_cli('check-job-status', 'j_page500', 'cft_a_b', '--url', url)
        assert r.returncode == status and 's3cret' not in r.stderr + r.stdout and '***@' in r.stderr, r.stderr

def test_an_error_page_is_one_line(impostor):
    "A proxy's HTML error page is said in one line (its status, type and title), not printed whole"
    one_line(run_cli('check-job-status', 'j_page500', 'cft_a_b', '--url', impostor), 1,
             "answered 500: text/html (a page titled '500 Internal Server Error'), not the job service's JSON (the server failed; see its log)")

@pytest.mark.parametrize('job_id', ['../me', '..', 'j_1/../../me', 'j 1', ''])
def test_a_job_id_is_never_a_path(impostor, job_id):
    "An id that cannot be a job's is refused before any request: it never names another route of the server"
    Impostor.paths.clear()
    for cmd in ('check-job-status', 'cancel-job', 'download-model'):
        one_line(run_cli(cmd, job_id, 'cft_a_b', '--url', impostor), 2, 'cannot be a job id')
    assert Impostor.paths == []

def test_a_server_that_is_not_the_job_service(impostor, tmp_path):
    one_line(run_cli('check-job-status', 'j_html', 'cft_a_b', '--url', impostor), 1, 'answered 200 with text/html, not JSON')
    one_line(run_cli('check-job-status', 'j_shape', 'cft_a_b', '--url', impostor), 1, 'answered JSON that the job service does not send')
    one_line(run_cli('download-model', 'j_cut', 'cft_a_b', '--url', impostor, '--output', tmp_path/'r.zip'), 1, 'the download of j_cut')
    one_line(run_cli('download-model', 'j_page', 'cft_a_b', '--url', impostor, '--output', tmp_path/'r.zip'), 1, 'that are not a results zip')
    one_line(run_cli('download-model', 'j_page', 'cft_a_b', '--url', impostor, '--use', 'best', '--output', tmp_path/'w.safetensors'), 1, 'that are not a LoRA weights file')
    assert list(tmp_path.iterdir()) == []

def test_an_output_that_cannot_be_written(impostor, tmp_path):
    one_line(run_cli('download-model', 'j_page', 'cft_a_b', '--url', impostor, '--output', tmp_path), 2, 'is a folder: give a file name in it')
    one_line(run_cli('download-model', 'j_page', 'cft_a_b', '--url', impostor, '--output', tmp_path/'no'/'r.zip'), 2, 'does not exist')
    one_line(run_cli('generate', tmp_path/'r.zip', 'a robot', '--output', tmp_path/'no'/'g.png'), 2, 'does not exist')

# an argument is at most 128 KB on Linux: 60,000 levels is as deep as a shell can pass
@pytest.mark.parametrize('args,said', [('[' * 60_000 + ']' * 60_000, 'nests too deeply'), ('{"seed": ' + '9' * 5000 + '}', 'Exceeds the limit (4300 digits)'),
                                       ('{"learning_rat": 1}', "did you mean 'learning_rate'?"),
                                       ('{"learning_rate": ' + '9' * 4000 + '}', 'learning_rate must be a finite number')])
def test_training_args_that_are_not_settings(tiny_model, tmp_path, args, said):
    (tmp_path/'data').mkdir()
    for cmd in (['train', 'robot', tiny_model, tmp_path/'data', 'a photo of sks robot'],
                ['train-diffuser', 'robot', 'cft_a_b', tiny_model, tmp_path/'data', 'a photo of sks robot', '--url', 'http://127.0.0.1:9']):
        one_line(run_cli(*cmd, '--training-args', args), 2, said)

@pytest.mark.parametrize('device,said', [('cuda', 'PyTorch sees no CUDA GPU on this machine'), ('tpu', "device 'tpu': cerebrium-ft runs on cpu, cuda")])
def test_a_device_this_machine_has_not(tiny_model, tmp_path, device, said):
    import torch
    if device == 'cuda' and torch.cuda.is_available(): pytest.skip('this machine has CUDA')
    from cerebrium_ft.testing import make_subject_images
    make_subject_images(tmp_path/'data', n=6, size=64)
    r = run_cli('train', 'robot', tiny_model, tmp_path/'data', 'a photo of sks robot', '--device', device, '--output', tmp_path/'out')
    one_line(r, 2, said)
    assert not (tmp_path/'out').exists()  # refused before anything was written or loaded
    one_line(run_cli('generate', tmp_path/'nothing.zip', 'a robot', '--device', device), 2, said)

def test_generate_nothing(tmp_path):
    one_line(run_cli('generate', tmp_path/'r.zip', 'a robot', '-n', '0'), 2, '-n and --steps must be 1 or more')

def test_ctrl_c_ends_a_command_with_status_130(tmp_path):
    "A command waiting on a service that never answers, interrupted: one line, status 130, as shells report Ctrl-C"
    import signal, socket, subprocess, time
    from conftest import BIN
    with socket.socket() as mute:  # takes the connection, never answers
        mute.bind(('127.0.0.1', 0)); mute.listen(1); mute.settimeout(120)
        p = subprocess.Popen([str(BIN/'cerebrium-ft'), 'get-most-recent-jobs', 'p_x', 'cft_a_b', '--url', f"http://127.0.0.1:{mute.getsockname()[1]}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C as a terminal delivers it: a test run started in the background (`&`) has SIGINT ignored, and Python keeps what it inherits
        conn, _ = mute.accept()  # the request is on its way: the command waits for the answer
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        conn.close()
    assert p.returncode == 130 and err.strip() == 'cerebrium-ft get-most-recent-jobs: interrupted', (p.returncode, err)
