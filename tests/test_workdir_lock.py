"""One run owns a work directory: a second `veripo iterate` on it stops at once naming the holder and touches
nothing; a dead run's lock is taken over with a warning; the lock goes at the end of a run, however it ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_veripo import workdir_lock
from lightning_veripo.cli import main
from lightning_veripo.workdir_lock import LOCK_FILE, WorkDirLockedError, hold_work_dir

# The first run: a process holding the lock (the module alone, loaded by path: no torch to import).
HOLD = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('workdir_lock', sys.argv[2])\n"
    "lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(lock)\n"
    "with lock.hold_work_dir(sys.argv[1], command='veripo iterate (the first run)'):\n"
    "    print('held', flush=True); sys.stdin.read()\n"
)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_a_second_iterate_on_a_held_work_dir_stops_at_once_naming_the_holder_and_touches_nothing(
    tmp_path, capsys
):
    work = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(work), workdir_lock.__file__], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        (work / "metrics.jsonl").write_text('{"stage": "sft"}\n')
        before = snapshot(work)
        code = main(["iterate", str(tmp_path / "missing-model"), "v.json", "--grpo.config", "g.yaml",
                     "--dpo.config", "d.yaml", "--work_dir", str(work),
                     "--make_tiny_if_missing", "true"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 1
        assert f"pid {holder.pid} on host {socket.gethostname()} since " in err
        assert "(veripo iterate (the first run))" in err and "another --work_dir" in err
        assert snapshot(work) == before and not (tmp_path / "missing-model").exists()
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not (work / LOCK_FILE).exists()  # released at the holder's normal end


def test_a_lock_left_by_a_dead_process_of_this_host_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0.0}))
    with pytest.warns(UserWarning, match=f"taking over the lock of a run that is gone .pid {pid} on host"):
        with hold_work_dir(tmp_path) as held:
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid() == held["pid"]
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize(
    "holder", [{"host": "another-host"}, {"host": socket.gethostname(), "pid": os.getppid()}]
)
def test_a_lock_record_this_run_cannot_prove_stale_is_refused_and_left_in_place(tmp_path, holder):
    record = json.dumps({"pid": 1, "started": 0.0, **holder})
    (tmp_path / LOCK_FILE).write_text(record)
    with pytest.raises(WorkDirLockedError, match=f"If that run has ended, remove {tmp_path / LOCK_FILE}"):
        with hold_work_dir(tmp_path):
            pass
    assert (tmp_path / LOCK_FILE).read_text() == record


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with hold_work_dir(tmp_path):
            assert (tmp_path / LOCK_FILE).is_file()
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_FILE).exists()
    with hold_work_dir(tmp_path):  # and can be taken again at once, without a warning
        pass
