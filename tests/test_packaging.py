"""`pip install .` (not only -e) gives keyetron, keyetron.parallel, keyetron.launch, the configs and the CLI."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_regular_install_has_every_package_and_the_model_configs(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    code = (
        "import keyetron, keyetron.parallel, keyetron.launch, keyetron.model, keyetron.backend;"
        "from keyetron.model import load_model_config;"
        "assert load_model_config('tiny').name == 'tiny';"
        "print(keyetron.parallel.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
    assert (target / "bin" / "keyetron").is_file()
