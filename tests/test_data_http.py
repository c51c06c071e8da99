"""Shards served over HTTP (a server on 127.0.0.1 in this process) stream into real stage runs; a shard the
server does not have is skipped and counted, and each manifest is fetched once per run."""
from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from adala.config import compose, override
from adala.run import run_stage


class RecordingHandler(SimpleHTTPRequestHandler):
    requested: list[str]

    def log_message(self, format: str, *args: object) -> None:
        self.requested.append(self.path)


@pytest.fixture
def served(demo_shards: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    """The demo shards' folder over HTTP: (base URL, paths requested so far)."""
    requested: list[str] = []
    handler = type("Handler", (RecordingHandler,), {"requested": requested})
    directory = str(Path(demo_shards["pretrain"]).parent)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_stage2_trains_on_shards_over_http(tmp_path: Path, served: tuple[str, list[str]], random_teacher: str) -> None:
    base, requested = served
    shards = f"{base}/pretrain-{{000000..000002}}.tar::{base}/gone-{{000000..000008}}.tar"
    result = run_stage(compose([
        "stage=align_features", override("run_dir", tmp_path), override("model.weights", random_teacher),
        "data=demo", override("data.train", shards), "data.http_retries=0", "data.http_timeout=10", "data.shuffle_buffer=50", "data.workers=2",
        "stage.batch_size=8", "train.max_steps=6", "train.log_every=1", "train.progress=false",
    ]))
    assert result.steps == 6
    shard_requests = {path for path in requested if path.endswith(".tar")}
    assert any(path.startswith("/pretrain-") for path in shard_requests)
    assert "/pretrain.manifest.json" in requested, "the manifest is checked over HTTP too"
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # Three in four listed shards are missing: each reader draws shards until it gets a real one.
    unreachable = [r.get("data/skipped_unreachable", 0) for r in records]
    assert unreachable[-1] >= 1 and any(p.startswith("/gone-") for p in requested)
    assert unreachable == sorted(unreachable), "counts are cumulative"


def test_each_manifest_is_read_once_per_run(tmp_path: Path, served: tuple[str, list[str]], random_teacher: str) -> None:
    """Validation resolves the shard lists and their manifests once (the data plan); the epoch-mode training stream
    and the evaluation stream read from that plan."""
    base, requested = served
    result = run_stage(compose([
        "stage=finetune_cls", "data=demo", override("run_dir", tmp_path), override("model.weights", random_teacher),
        override("data.train", f"{base}/finetune-000000.tar"), override("data.val", f"{base}/val-000000.tar"),
        "stage.batch_size=8", "train.max_steps=2", "train.progress=false",
    ]))
    assert 0.0 <= result.metrics["top1"] <= 1.0
    assert requested.count("/finetune.manifest.json") == 1 and requested.count("/val.manifest.json") == 1, requested
