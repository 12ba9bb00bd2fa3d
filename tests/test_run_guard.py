"""One run per output folder, and signals that stop training at a step boundary (real signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from exemplar.train.run_guard import OutputDirBusy, StopRequests, output_dir_lock

HOLD = textwrap.dedent(
    """
    import sys, time
    from exemplar.train.run_guard import output_dir_lock
    with output_dir_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
    """
)


def _holder(folder):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_the_same_folder_is_refused_with_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with (
            pytest.raises(OutputDirBusy, match=rf"in use by another run \(pid {proc.pid} on "),
            output_dir_lock(tmp_path),
        ):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with output_dir_lock(tmp_path):  # taken at once
        pass


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with output_dir_lock(tmp_path), output_dir_lock(tmp_path / "."):
        proc = subprocess.run(
            [sys.executable, "-c", HOLD, str(tmp_path)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            timeout=60,
        )
        assert proc.returncode != 0 and "in use by another run" in proc.stderr
    with output_dir_lock(tmp_path):  # released once the outer block ended
        pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_is_recorded_and_a_second_stops_at_once(sig):
    previous = signal.getsignal(sig)
    with StopRequests() as stop:
        os.kill(os.getpid(), sig)
        assert stop.requested and stop.name == signal.Signals(sig).name
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is previous  # the process's own handling is back
