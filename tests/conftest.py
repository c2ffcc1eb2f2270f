import subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

def run_cli(*args, timeout=1200, **kw) -> subprocess.CompletedProcess:
    "Run the installed `cerebrium-ft` console script as a subprocess, capturing its output; `timeout` is a generous bound for a slow, busy machine (a test that waits on a job's progress waits on it instead)"
    exe = BIN/'cerebrium-ft'
    assert exe.exists(), f"{exe} missing: install the package first (bash tools/setup.sh)"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)

@pytest.fixture
def cli(): return run_cli

@pytest.fixture(scope='session')
def tiny_model(tmp_path_factory):
    "A tiny SD1.5-shaped pipeline built once per test session with the `tiny-model` command"
    dst = tmp_path_factory.mktemp('models')/'tiny-sd'
    r = run_cli('tiny-model', dst)
    assert r.returncode == 0, r.stderr
    return dst

@pytest.fixture(scope='session')
def postgres():
    "A real PostgreSQL server for the session (tools/postgres.sh: Debian's package, on a Unix socket in a temporary folder); its admin URL"
    import tempfile
    d = Path(tempfile.mkdtemp(prefix='cerebrium-ft-pg-'))
    r = subprocess.run(['bash', str(ROOT/'tools/postgres.sh'), 'start', str(d)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    yield r.stdout.strip()
    subprocess.run(['bash', str(ROOT/'tools/postgres.sh'), 'stop', str(d)], capture_output=True, timeout=120)

@pytest.fixture
def postgres_db(postgres):
    "The URL of a new, empty database on the session's PostgreSQL server (dropped after the test)"
    import secrets, psycopg
    from sqlalchemy.engine import make_url
    base, name = make_url(postgres), 't_' + secrets.token_hex(6)
    conninfo = dict(dbname='postgres', user=base.username, host=base.query['host'])
    with psycopg.connect(**conninfo, autocommit=True) as c: c.execute(f'CREATE DATABASE {name}')
    yield base.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(**conninfo, autocommit=True) as c: c.execute(f'DROP DATABASE {name} WITH (FORCE)')
