"""Atomic artefacts: a writer that fails or is killed never leaves a half-written file or folder behind,
and the training run folder counts as complete only once its lineage is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import types

import pytest

from sft_dagster import atomic
from sft_dagster.defs.common import code_version
from sft_dagster.defs.training import completed_run, prune_training_runs


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = atomic.write_json(tmp_path / "report.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic.atomic_file(path, "w") as fh:
        fh.write('{"v": 2')  # half a file, then the writer dies
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_folder_build_keeps_the_old_folder(tmp_path):
    target = tmp_path / "adapter"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed")
    assert (target / "weights").read_text() == "old"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("new")
        (tmp / "config").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config", "weights"]
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_killed_writer_leaves_the_published_file_whole(tmp_path):
    # A separate process writes a large file slowly and is SIGKILLed mid-write.
    path = tmp_path / "table.bin"
    atomic.write_bytes(path, b"A" * 1000)
    script = textwrap.dedent(f"""
        import time
        from sft_dagster import atomic
        with atomic.atomic_file({str(path)!r}, "wb") as fh:
            fh.write(b"B" * 500)
            fh.flush()
            print("half", flush=True)
            time.sleep(60)
            fh.write(b"B" * 500)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "half"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == b"A" * 1000


def test_code_version_covers_every_module_of_a_package(tmp_path, monkeypatch):
    package = tmp_path / "stagepkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .trainer import step\n")
    (package / "trainer.py").write_text("def step():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__("stagepkg")
    before = code_version(module)
    (package / "trainer.py").write_text("def step():\n    return 2\n")  # only a non-init module changes
    assert code_version(module) != before
    single = types.ModuleType("single")
    single.__file__ = str(package / "trainer.py")
    assert code_version(single) != before


def test_only_a_run_with_its_lineage_written_is_complete(tmp_path):
    run = tmp_path / "training" / "abc"
    (run / "adapter").mkdir(parents=True)
    atomic.write_json(run / "metrics.json", {"method": "lora"})
    assert completed_run(run) is None  # the adapter exists, but the run never finished
    atomic.write_json(run / "lineage.json", {"method": "lora"})
    assert completed_run(run)["adapter_dir"] == str(run / "adapter")


def test_old_training_runs_are_pruned_but_never_the_current_one(tmp_path):
    training = tmp_path / "training"
    runs = []
    for i in range(5):
        run = training / f"run{i}"
        run.mkdir(parents=True)
        atomic.write_json(run / "lineage.json", {"i": i})
        os.utime(run / "lineage.json", (1000 + i, 1000 + i))
        runs.append(run)
    removed = prune_training_runs(training, keep=runs[0], n=3)
    assert sorted(p.name for p in training.iterdir()) == ["run0", "run3", "run4"]
    assert sorted(p.name for p in removed) == ["run1", "run2"]


def test_locked_serialises_read_modify_write_across_processes(tmp_path):
    # Four processes each append 50 lines through read-modify-replace under the lock: none is lost.
    target = tmp_path / "log.txt"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from sft_dagster import atomic
        path = Path({str(target)!r})
        for i in range(50):
            with atomic.locked(path):
                old = path.read_text() if path.exists() else ""
                atomic.write_text(path, old + f"{{sys.argv[1]}}-{{i}}\\n")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)]) for n in range(4)]
    assert [p.wait() for p in procs] == [0, 0, 0, 0]
    lines = target.read_text().splitlines()
    assert sorted(lines) == sorted(f"{n}-{i}" for n in range(4) for i in range(50))
