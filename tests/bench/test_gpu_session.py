"""bench/gpu_session.sh refuses a plan it cannot carry out before it does any work."""
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run(tmp_path, *steps, **env):
    out = tmp_path / "out"
    # PYTHON=false: any step that started would fail at once instead of measuring
    result = subprocess.run(["bash", str(SCRIPT), *steps], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "OUT": str(out), "PYTHON": "false", **env})
    return result, out


def test_an_unknown_step_is_refused_before_any_step_runs(tmp_path):
    result, out = run(tmp_path, "tests", "encoder")
    assert result.returncode == 2
    assert "unknown step 'encoder'" in result.stderr and "encoders" in result.stderr
    assert not (out / "summary.txt").exists() and not (out / "machine.txt").exists()


def test_steps_whose_limits_exceed_one_device_command_are_refused(tmp_path):
    result, out = run(tmp_path, "tests", "encoders", "stages", "preprocess")
    assert result.returncode == 2
    assert "850 s" in result.stderr and "stages=360s" in result.stderr and "two commands" in result.stderr
    assert not (out / "machine.txt").exists()


def test_a_plan_within_the_budget_runs_its_steps(tmp_path):
    result, out = run(tmp_path, "stages", STAGES_VARIANTS="fp32/flash bf16/flash", LIMIT_STAGES="20")
    # every step ran (and failed, there being no python): the plan itself was accepted
    assert "stages fp32/flash: FAILED" in (out / "summary.txt").read_text()
    assert "stages bf16/flash: FAILED" in (out / "summary.txt").read_text()
    assert result.returncode == 1
