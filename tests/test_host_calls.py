"""Live calls across a host's backend processes (ml_backend/host_calls.py): another process's call counts, this
process's own do not, and a call whose process was killed stops counting (its file is removed)."""
from __future__ import annotations

import signal
import time

from ml_backend.host_calls import HostLiveCalls
from tests.services import hold_a_live_call, wait_for

def test_another_process_live_call_counts_until_it_ends(tmp_path):
    calls = HostLiveCalls.for_model_dir(tmp_path / "models")
    assert not calls.others_live()
    with calls.mark():
        assert not calls.others_live()  # this process's own calls are its pre-warm's own business
    other = hold_a_live_call(tmp_path / "models", tmp_path / "release")
    try:
        assert calls.others_live()
        assert not HostLiveCalls.for_model_dir(tmp_path / "other-models").others_live()  # another MODEL_DIR
        (tmp_path / "release").touch()
        assert other.wait(20) == 0
        assert not calls.others_live() and not list(calls.folder.iterdir())
    finally:
        other.kill()


def test_a_killed_process_live_call_stops_counting(tmp_path):
    calls = HostLiveCalls.for_model_dir(tmp_path / "models")
    other = hold_a_live_call(tmp_path / "models", tmp_path / "never")
    assert calls.others_live()
    other.send_signal(signal.SIGKILL)
    other.wait(20)
    assert list(calls.folder.iterdir())  # the killed call's file is still there...
    started = time.monotonic()
    wait_for(lambda: not calls.others_live(), 5, "the killed process's call to stop counting")
    assert time.monotonic() - started < 1 and not list(calls.folder.iterdir())  # ...and the next look removes it
