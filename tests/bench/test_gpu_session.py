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
    # each run's limit and 15 s to stop: tests 100, encoders 240, 4 stage variants of 90, preprocess 150
    assert "955 s" in result.stderr and "stages=420s" in result.stderr and "two commands" in result.stderr
    assert not (out / "machine.txt").exists()


def test_a_plan_within_the_budget_runs_its_steps(tmp_path):
    result, out = run(tmp_path, "stages", STAGES_VARIANTS="fp32/flash bf16/flash", LIMIT_STAGES="20")
    # every step ran (and failed, there being no python): the plan itself was accepted
    assert "stages fp32/flash: FAILED" in (out / "summary.txt").read_text()
    assert "stages bf16/flash: FAILED" in (out / "summary.txt").read_text()
    assert result.returncode == 1


def test_a_limit_that_is_not_a_number_is_refused(tmp_path):
    result, out = run(tmp_path, "tests", LIMIT_TESTS="2m")
    assert result.returncode == 2 and "LIMIT_TESTS=2m is not a number of seconds" in result.stderr
    assert not (out / "machine.txt").exists()


def test_wheels_are_installed_only_for_an_accepted_plan(tmp_path):
    # the refusal comes first even where wheels wait to be installed (PYTHON=false would fail that install)
    checkout = tmp_path / "checkout"
    (checkout / "bench").mkdir(parents=True)
    (checkout / "bench" / "gpu_session.sh").write_text(SCRIPT.read_text())
    (checkout / ".whl").mkdir()
    (checkout / ".whl" / "segment_anything-1.0-py3-none-any.whl").write_bytes(b"")
    result = subprocess.run(["bash", str(checkout / "bench" / "gpu_session.sh"), "nonsense"], capture_output=True,
                            text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "PYTHON": "false"})
    assert result.returncode == 2 and "unknown step 'nonsense'" in result.stderr
