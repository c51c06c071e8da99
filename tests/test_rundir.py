"""Run directories are safe: no fresh run over an earlier one, one writer at a time, a shared demo cache."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from adala.__main__ import main
from adala.config import compose, override
from adala.engine.checkpoint import COMPLETE_MARKER
from adala.models.weights import read_export_metadata
from adala.run import run_stage

REPO = Path(__file__).resolve().parent.parent


def stage2(run_dir: Path, shards: dict[str, str], teacher: str, *extra: str) -> list[str]:
    return ["stage=align_features", "data=demo", override("run_dir", run_dir), override("model.weights", teacher),
            override("data.train", shards["pretrain"]), "stage.batch_size=4", "train.log_every=1",
            "train.progress=false", *extra]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_fresh_run_into_used_dir_refused_overwrite_replaces_resume_continues(
    tmp_path: Path, demo_shards: dict[str, str], random_teacher: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_stage(compose(stage2(run_dir, demo_shards, random_teacher, "train.max_steps=4", "train.save_every=2")))
    assert checkpoints(run_dir) == ["step-2", "step-4"]
    before = snapshot(run_dir)

    assert main(stage2(run_dir, demo_shards, random_teacher, "train.max_steps=2", "train.save_every=1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adala: error: ") and "\n" not in err
    assert "resume=auto" in err and "overwrite=true" in err and "checkpoints" in err
    assert snapshot(run_dir) == before, "a refused run must leave the earlier run untouched"

    assert main(stage2(run_dir, demo_shards, random_teacher, "overwrite=true", "resume=auto")) == 2
    assert "choose one" in capsys.readouterr().err

    # overwrite=true: the earlier run's checkpoints, export and log are gone before the new run writes.
    replaced = run_stage(compose(stage2(run_dir, demo_shards, random_teacher, "train.max_steps=2", "train.save_every=1",
                                        "overwrite=true")))
    assert checkpoints(run_dir) == ["step-1", "step-2"]
    assert logged_steps(run_dir) == [1, 2]
    assert read_export_metadata(replaced.export)["step"] == 2

    resumed = run_stage(compose(stage2(run_dir, demo_shards, random_teacher, "train.max_steps=3", "train.save_every=1",
                                       "resume=auto")))
    assert resumed.steps == 3 and logged_steps(run_dir) == [1, 2, 3]
    assert checkpoints(run_dir) == ["step-2", "step-3"]


def test_second_writer_refused_and_killed_holder_leaves_no_lock(
    tmp_path: Path, demo_shards: dict[str, str], random_teacher: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "adala", *stage2(run_dir, demo_shards, random_teacher, "train.max_steps=100000",
                                                "train.save_every=100000")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "log.jsonl").exists():  # the lock is taken before anything is logged
            assert first.poll() is None and time.time() < deadline, "the first run ended before the test could start"
            time.sleep(0.05)
        assert main(stage2(run_dir, demo_shards, random_teacher, "train.max_steps=2", "resume=auto")) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("adala: error: ") and "\n" not in err
        assert f"in use by another run (held by pid {first.pid} on " in err
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # The kernel dropped the killed holder's lock: the next run goes ahead (no checkpoint yet: from step 0).
    result = run_stage(compose(stage2(run_dir, demo_shards, random_teacher, "train.max_steps=2", "resume=auto")))
    assert result.steps == 2 and logged_steps(run_dir) == [1, 2]
    assert (run_dir / "checkpoints" / "step-2" / COMPLETE_MARKER).is_file()


CREATE_SHARDS = """
import json, sys, time
from pathlib import Path
from adala.logs import configure_logging
from adala.data.demo_data import ensure_demo_shards
configure_logging()
Path(sys.argv[3]).touch()  # ready
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
print(json.dumps(ensure_demo_shards(Path(sys.argv[1]), {"pretrain": 300, "val": 60}, per_shard=100)))
"""


def test_two_demo_cache_creators_give_one_intact_cache(tmp_path: Path) -> None:
    cache, go = tmp_path / "cache" / "demo-entry", tmp_path / "go"
    ready = [tmp_path / f"ready-{n}" for n in range(2)]
    creators = [subprocess.Popen([sys.executable, "-c", CREATE_SHARDS, str(cache), str(go), str(flag)], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flag in ready]
    deadline = time.time() + 120
    while not all(flag.exists() for flag in ready):  # both have imported everything: they start together
        assert all(p.poll() is None for p in creators) and time.time() < deadline
        time.sleep(0.01)
    go.touch()
    outputs = [process.communicate(timeout=120) for process in creators]
    assert [process.returncode for process in creators] == [0, 0], [err for _, err in outputs]
    patterns = [json.loads(out) for out, _ in outputs]
    assert patterns[0] == patterns[1]
    writers = [err for _, err in outputs if "writing the demo shards" in err]
    waiters = [err for _, err in outputs if "waiting for the demo shards" in err]
    assert len(writers) == 1 and len(waiters) == 1, "the second creator must wait for the first and reuse its shards"
    record = json.loads((cache / "demo.json").read_text())
    assert record["shards"] == {"pretrain": 3, "val": 1}
    for split, count in (("pretrain", 300), ("val", 60)):
        manifest = json.loads((cache / f"{split}.manifest.json").read_text())
        assert manifest["samples"] == count
        keys = set()
        for shard in manifest["shards"]:
            with tarfile.open(cache / shard["name"]) as tar:
                keys.update(member.name.split(".")[0] for member in tar.getmembers())
            assert (cache / shard["name"]).stat().st_size == shard["bytes"]
        assert len(keys) == count
    assert not [p.name for p in cache.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["stage=align_features", "train.eval_every=2"], "stage align_features has no evaluation metric"),
        (["stage=finetune_cls", "train.eval_every=2"], "train.eval_every evaluates on data.val"),
        (["stage=finetune_cls", "train.export_every=-1"], "train.export_every must be a number of steps"),
    ],
)
def test_bad_eval_and_export_settings_give_one_line(
    extra: list[str], expected: str, tmp_path: Path, demo_shards: dict[str, str], random_teacher: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [*extra, "data=demo", override("run_dir", tmp_path / "run"), override("model.weights", random_teacher),
            override("data.train", demo_shards["finetune"]), "train.max_steps=2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adala: error: ") and expected in err and "\n" not in err
    assert not (tmp_path / "run").exists()


LOG_LINES = """
import logging
from adala.logs import configure_logging
configure_logging()
logging.getLogger("adala.test").info("progress note")
logging.getLogger("adala.test").warning("something odd")
"""


@pytest.mark.parametrize("rank", ["0", "1"])
def test_log_lines_name_their_rank_and_other_ranks_log_warnings_only(rank: str) -> None:
    env = {**os.environ, "RANK": rank}
    err = subprocess.run([sys.executable, "-c", LOG_LINES], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True).stderr
    assert f"[rank {rank}] WARNING adala.test: something odd" in err
    assert ("progress note" in err) == (rank == "0")
    if rank == "0":
        assert "[rank 0] INFO adala.test: progress note" in err


def test_progress_bars_only_on_a_terminal(tmp_path: Path, demo_shards: dict[str, str], random_teacher: str) -> None:
    """No carriage returns in a batch log (stderr a file or pipe); bars for training and evaluation on a terminal."""
    import fcntl
    import pty
    import struct
    import termios
    import tty

    def run(name: str, stderr: int) -> subprocess.Popen:
        args = ["stage=finetune_cls", "data=demo", override("run_dir", tmp_path / name), override("model.weights", random_teacher),
                override("data.train", demo_shards["finetune"]), override("data.val", demo_shards["val"]),
                "stage.batch_size=16", "train.max_steps=2", "train.eval_every=1"]
        return subprocess.Popen([sys.executable, "-m", "adala", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=stderr)

    piped = run("piped", subprocess.PIPE)
    _, err = piped.communicate(timeout=300)
    assert piped.returncode == 0, err.decode()
    assert b"\r" not in err
    assert b"[rank 0] INFO" in err and b"val top1" in err

    main_fd, terminal_fd = pty.openpty()
    tty.setraw(terminal_fd)  # no newline translation: every carriage return comes from the run
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    on_terminal = run("terminal", terminal_fd)
    os.close(terminal_fd)
    seen = b""
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # the terminal closed: the run ended
            break
        if not chunk:
            break
        seen += chunk
    os.close(main_fd)
    assert on_terminal.wait(timeout=300) == 0, seen.decode(errors="replace")
    assert b"\r" in seen and b"evaluating" in seen
