"""``keyetron bench calibrate``: the fit recovers known coefficients, and the command writes a
calibration file the balancer loads, with the held-out error reported."""
import json

import numpy as np

from keyetron.perf.calibrate import _fit
from keyetron.cli import main
from keyetron.parallel.balancer import CostModel


def test_the_fit_recovers_fixed_linear_and_quadratic_terms():
    x = np.array([64.0, 256, 576, 1024, 2048])
    assert np.allclose(_fit(x, 0.01 + 2e-5 * x + 3e-9 * x * x), (0.01, 2e-5, 3e-9), rtol=1e-6)


def test_negative_terms_are_dropped_not_fitted_below_zero():
    x = np.array([100.0, 200, 400, 800])
    fixed, lin, quad = _fit(x, 5e-4 * x - 1e-8 * x * x)  # concave data: no valid quadratic term
    assert quad == 0.0 and lin > 0 and fixed >= 0


def test_the_command_writes_a_loadable_seconds_model_and_reports_heldout_error(tmp_path, capsys):
    out = tmp_path / "cal.json"
    assert main(["bench", "calibrate", "--config", "tiny", "--out", str(out), "--patches", "64", "256",
                 "--tokens", "64", "256", "--repeats", "1", "--heldout-rows", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = CostModel.load(out)
    assert model.units == "seconds" and "tiny" in model.source
    assert len(report["heldout"]) == 2 and all(h["measured_s"] > 0 and h["predicted_s"] > 0
                                               for h in report["heldout"])
    assert all(np.isfinite(report["errors"]))
