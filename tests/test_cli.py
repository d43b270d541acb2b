"""The keyetron command."""
import json
import subprocess
import sys

from keyetron.cli import main


def test_model_info_keye_8b_counts(capsys):
    assert main(["model-info", "--config", "keye-8b", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert set(counts) == {"total", "vit", "projector", "llm"}
    assert abs(counts["total"] / 8.64e9 - 1) < 0.005
    assert abs(counts["vit"] / 413e6 - 1) < 0.005
    assert abs(counts["projector"] / 40e6 - 1) < 0.01
    assert abs(counts["llm"] / 8.19e9 - 1) < 0.005
    assert counts["total"] == counts["vit"] + counts["projector"] + counts["llm"]


def test_console_script_is_installed_and_reports_config_errors():
    out = subprocess.run([sys.executable, "-m", "keyetron.cli", "model-info", "--config", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown model config 'nope'" in out.stderr
