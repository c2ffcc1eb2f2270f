import subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

def run_cli(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    "Run the installed `cerebrium-ft` console script as a subprocess, capturing its output"
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
