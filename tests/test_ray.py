"""Jobs on a Ray cluster, for real: a head and a second node started with `ray start` (one CPU each), a job server with
`--executor ray` over them, jobs submitted with the CLI as a user submits them"""
import json, os, re, signal, subprocess, time
from pathlib import Path
import pytest
from diffusers import StableDiffusionPipeline
from cerebrium_ft.executor import job_processes
from cerebrium_ft.results import load_results
from cerebrium_ft.testing import make_subject_images
from conftest import BIN, run_cli
from test_service import Server, free_port, job, submit, wait_for

ENV = {**os.environ, 'RAY_USAGE_STATS_ENABLED': '0'}
FP32 = dict(mixed_precision='no')  # the same arithmetic on every CPU: 'auto' would be bf16 on one with AMX, fp32 elsewhere

@pytest.fixture(scope='module')
def second_tmp(tmp_path_factory): return tmp_path_factory.mktemp('second-node')

class RayNode:
    """A Ray node this test starts: `ray start --block` in a session of its own, with ports of its own, so that it shares nothing with another
    Ray on the machine; stopped by its pid (SIGTERM: `ray start --block` ends every process it started), its session's processes alone"""
    def __init__(self, log:Path, *args, env=None):
        ports = [f'--{o}={free_port()}' for o in ('node-manager-port', 'object-manager-port', 'dashboard-agent-listen-port', 'dashboard-agent-grpc-port',
                                                  'runtime-env-agent-port', 'metrics-export-port')]
        self.log = log
        with open(log, 'w') as out:
            self.p = subprocess.Popen([str(BIN/'ray'), 'start', '--block', '--num-cpus=1', '--disable-usage-stats', *ports, *map(str, args)],
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**ENV, **(env or {})})
        end = time.time() + 180
        while 'block forever' not in log.read_text():  # up, and watching its processes
            assert self.p.poll() is None and time.time() < end, log.read_text()[-3000:]
            time.sleep(0.2)
    def stop(self):
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            try: os.killpg(self.p.pid, sig)
            except ProcessLookupError: break
            try: self.p.wait(wait); break
            except subprocess.TimeoutExpired: continue

@pytest.fixture(scope='module')
def ray_cluster(tmp_path_factory, second_tmp):
    "A head and a second node with a temporary folder of its own (where its jobs run), one CPU each, on ports of their own, stopped after; the head's address"
    port, logs = free_port(), tmp_path_factory.mktemp('ray-logs')
    nodes = [RayNode(logs/'head.log', '--head', f'--port={port}', f'--ray-client-server-port={free_port()}', '--include-dashboard=false',
                     f"--temp-dir={tmp_path_factory.mktemp('ray')}")]
    address = f"127.0.0.1:{port}"
    try:
        nodes.append(RayNode(logs/'second.log', f'--address={address}', env=dict(TMPDIR=str(second_tmp))))
        yield address
    finally:
        for n in reversed(nodes): n.stop()

@pytest.fixture
def data(tmp_path):
    make_subject_images(tmp_path/'robot', n=6, size=64)
    return tmp_path/'robot'

@pytest.fixture
def ray_server(tmp_path, tiny_model, ray_cluster):
    s = Server(tmp_path/'data', workers=None, model_dir=tiny_model, extra=['--executor', 'ray', '--ray-address', ray_cluster]).start()
    s.key = next(w for w in s.output().split() if w.startswith('cft_'))
    yield s
    s.stop()

def nodes_of(server, jid) -> list[str]:
    "The Ray node each attempt of the job started on, from its log as it came back to the server"
    return re.findall(r'--- attempt \d+ started .* on Ray node (\w+) on \S+\n', (server.data_dir/'jobs'/jid/'job.log').read_text())

def folders_of(server, jid) -> list[Path]:
    "The folder on its node each attempt of the job ran in, from the server's own log (the job's log, which its project reads, names no path of a node)"
    return [Path(f) for f in re.findall(rf'cerebrium-ft executor: job {jid} runs on Ray node \w+ on \S+, in (\S+)\n', server.output())]

def folder_of(server, jid) -> Path: return folders_of(server, jid)[-1]

def test_jobs_run_on_both_nodes_and_their_results_load(ray_server, ray_cluster, second_tmp, tiny_model, data, tmp_path):
    "Two jobs at once on a cluster of two one-CPU nodes: Ray places one on each, both succeed, and their results come back to the server, download and load"
    assert re.search(rf"2 workers, jobs on the Ray cluster at [\d.]+:{ray_cluster.split(':')[1]};", ray_server.output()), ray_server.output()  # one job per node's CPU
    ids = [json.loads(submit(ray_server, tiny_model, data, steps=8, extra=FP32).stdout)['id'] for _ in range(2)]
    wait_for(ray_server, ids[1], lambda j: j['status'] == 'running' and job(ray_server, ids[0])['status'] == 'running', timeout=120)  # both at once
    done = [wait_for(ray_server, jid, lambda j: j['status'] not in ('queued', 'running'), timeout=300) for jid in ids]
    assert [j['status'] for j in done] == ['succeeded'] * 2, done
    placed = [(nodes_of(ray_server, jid), folders_of(ray_server, jid)) for jid in ids]
    assert all(len(n) == len(f) == 1 for n, f in placed) and placed[0][0] != placed[1][0], placed  # each on a node of its own
    assert sum(second_tmp in f.parents for _, [f] in placed) == 1, placed  # one in the second node's own temporary folder
    for jid in ids:
        log = run_cli('check-job-status', jid, ray_server.key, '--include-logs', '--url', ray_server.url).stdout
        assert 'plan: 8 steps' in log and not re.search(r'/\S*(cerebrium-ft-ray|/jobs/j_)', log), log  # no path of a node's or of the server's
    for jid in ids:
        r = run_cli('download-model', jid, ray_server.key, '--output', tmp_path/f'{jid}.zip', '--url', ray_server.url)
        assert r.returncode == 0, r.stderr
        m = load_results(StableDiffusionPipeline.from_pretrained(tiny_model), tmp_path/f'{jid}.zip')
        assert m['steps'] == 8
        assert not folder_of(ray_server, jid).exists()  # the node's copy is removed once the job has ended

def test_a_server_killed_under_a_running_job_resumes_it_once(tmp_path, tiny_model, data, ray_cluster):
    "kill -9 of the server while its job trains on Ray; the server started again finds the job's actor by name, brings back its checkpoint, ends it, and runs the job again from that checkpoint: one run at a time, each step logged once"
    s = Server(tmp_path/'data', workers=None, model_dir=tiny_model, extra=['--executor', 'ray', '--ray-address', ray_cluster]).start()
    s.key = next(w for w in s.output().split() if w.startswith('cft_'))
    jid = json.loads(submit(s, tiny_model, data, steps=200, extra=dict(FP32, checkpointing_steps=10)).stdout)['id']
    wait_for(s, jid, lambda j: j["step"] >= 20, timeout=240)
    s.kill9()
    assert job_processes(folder_of(s, jid))  # the job trains on without its server
    s.start()
    try:
        j = wait_for(s, jid, lambda j: j['status'] not in ('queued', 'running'), timeout=300)
        assert j['status'] == 'succeeded' and j['attempts'] == 2 and j['resumed_from'] >= 10, j  # from a checkpoint that came back from the node
        log = run_cli('check-job-status', jid, s.key, '--include-logs', '--url', s.url).stdout
        assert len(nodes_of(s, jid)) == 2 and re.search(rf"resuming from step_0*{j['resumed_from']}: step {j['resumed_from']} of 200", log), log
        steps = [int(r.split(',')[0]) for r in (s.data_dir/'jobs'/jid/'results'/'metrics.csv').read_text().splitlines()[1:]]
        assert steps == list(range(1, 201)), steps  # each step once: the first run ended before the second began
    finally: s.stop()

def test_a_job_ray_places_nowhere_fails_saying_so(tmp_path, tiny_model, data, ray_cluster):
    """A server allowed more jobs at once than the cluster has CPUs: the third job's actor waits for a CPU that never frees. Once it has shown no
    progress for --stall-minutes it fails saying Ray placed it on no node, and why; the other two train on"""
    s = Server(tmp_path/'data', workers=3, model_dir=tiny_model, extra=['--executor', 'ray', '--ray-address', ray_cluster, '--stall-minutes', '0.5']).start()
    s.key = next(w for w in s.output().split() if w.startswith('cft_'))
    try:
        ids = [json.loads(submit(s, tiny_model, data, steps=3000, extra=FP32).stdout)['id'] for _ in range(2)]
        for jid in ids: wait_for(s, jid, lambda j: j['status'] == 'running' and j['step'] > 0, timeout=180)
        waiting = json.loads(submit(s, tiny_model, data, steps=3000, extra=FP32).stdout)['id']
        j = wait_for(s, waiting, lambda j: j['status'] not in ('queued', 'running'), timeout=120)
        assert (j['status'], j['error']) == ('failed', "Ray placed the job on no node in 0.5 minutes: no node had a CPU free for it; "
                                                       "submit it again once the cluster has room for it, or asking for fewer gpus"), j
        assert [job(s, jid)['status'] for jid in ids] == ['running', 'running']
        for jid in ids: assert json.loads(run_cli('cancel-job', jid, s.key, '--url', s.url, '--json').stdout)['status'] == 'cancelled'
    finally: s.stop()

def raylet_of(node:str) -> tuple[int, bool]:
    "The pid of the raylet of the Ray node whose id starts with `node`, and whether it is the head's"
    for p in subprocess.run(['pgrep', '-f', 'raylet/raylet'], capture_output=True, text=True).stdout.split():
        cmd = open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='replace').split('\0')
        if any(a.startswith(f'--node_id={node}') for a in cmd): return int(p), '--head' in cmd
    raise AssertionError(f"no raylet for node {node}")

def test_cancel_and_a_lost_node_end_a_job_on_its_node(ray_server, tiny_model, data):
    """Two jobs, one on each node. Cancelling the one on the second node ends its processes there (before the answer comes) and
    brings back its log. A third job then takes that node, and its raylet is killed under it (the last use of the cluster here: it
    keeps its head alone): the job fails, saying why, and its training ends with its actor. The head's job trains on throughout"""
    ids = [json.loads(submit(ray_server, tiny_model, data, steps=3000, extra=FP32).stdout)['id'] for _ in range(2)]
    for jid in ids: wait_for(ray_server, jid, lambda j: j['status'] == 'running' and j['step'] > 0, timeout=180)
    remote, head = sorted(ids, key=lambda jid: raylet_of(nodes_of(ray_server, jid)[0])[1])
    assert job_processes(folder_of(ray_server, remote))  # its run-job, on the node
    r = run_cli('cancel-job', remote, ray_server.key, '--url', ray_server.url, '--json')
    assert r.returncode == 0 and json.loads(r.stdout)['status'] == 'cancelled', r.stderr
    assert not job_processes(folder_of(ray_server, remote)) and not folder_of(ray_server, remote).exists()
    assert 'plan: 3000 steps' in run_cli('check-job-status', remote, ray_server.key, '--include-logs', '--url', ray_server.url).stdout  # its log came back
    lost = json.loads(submit(ray_server, tiny_model, data, steps=3000, extra=FP32).stdout)['id']
    wait_for(ray_server, lost, lambda j: j['status'] == 'running' and j['step'] > 0, timeout=180)
    raylet, is_head = raylet_of(nodes_of(ray_server, lost)[0])
    assert not is_head  # the free node's
    os.kill(raylet, signal.SIGKILL)
    j = wait_for(ray_server, lost, lambda j: j['status'] != 'running', timeout=120)
    assert j['status'] == 'failed' and 'the Ray actor running the job is gone (its node died or was stopped)' in j['error'], j
    wait_for(ray_server, lost, lambda j: not job_processes(folder_of(ray_server, lost)), timeout=30)  # its training ended with its actor
    kept = job(ray_server, head)
    assert kept['status'] == 'running', (kept, run_cli('check-job-status', head, ray_server.key, '--include-logs', '--url', ray_server.url).stdout[-3000:])
    assert json.loads(run_cli('cancel-job', head, ray_server.key, '--url', ray_server.url, '--json').stdout)['status'] == 'cancelled'

def test_serve_says_what_is_wrong_with_its_ray_options(tmp_path):
    "Each refused at once, before anything is stored: a wrong --executor, --gpus or --ray-address with the wrong executor, and an address where no Ray answers"
    port = free_port()  # nothing listens there
    for args, status, message in [(['--executor', 'slurm'], 2, "--executor slurm: local (jobs as child processes of this server) or ray (on a Ray cluster, with --ray-address)"),
                                  (['--executor', 'ray', '--gpus', '0'], 2, "--gpus is for --executor local: on Ray, the cluster places each job on a node with the GPUs the job asks for"),
                                  (['--ray-address', '127.0.0.1:6379'], 2, "--ray-address goes with --executor ray"),
                                  (['--executor', 'ray', '--ray-address', f'127.0.0.1:{port}'], 1, f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there (nothing answers at 127.0.0.1:{port}")]:
        r = run_cli('serve', '--data-dir', tmp_path/'data', '--port', str(free_port()), *args, timeout=60)
        assert r.returncode == status and message in r.stderr, r.stderr
        assert not (tmp_path/'data').exists()
