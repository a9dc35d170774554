"""Shards over the network: the reader streams them through ``pipe:curl`` URLs from an HTTP server on 127.0.0.1
(started and stopped here); a connection dropped mid-shard follows the corrupt-shard policy (skip with one log
line, or raise naming the shard) and leaves no curl process behind."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from brainfm.data.reader import make_dataloader
from brainfm.io import BrainFMInputError

CURL = "pipe:curl -fsS --connect-timeout 5 --max-time 60 {base}/{{name}}"
pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the pipe: URLs under test run curl")


class _ShardHandler(SimpleHTTPRequestHandler):
    """Serves the shard folder; a shard named in ``server.drop`` gets its full Content-Length announced but
    only the first third of its bytes before the connection is closed."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        self.server.requests.append(self.path)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        name = self.path.lstrip("/")
        if name not in self.server.drop:
            super().do_GET()
            return
        data = (Path(self.directory) / name).read_bytes()
        self.server.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 3])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def serve(shard_set) -> Iterator[callable]:
    """``serve(drop=())`` -> (base URL, server): the shard folder over HTTP until the test ends."""
    servers: list[ThreadingHTTPServer] = []
    threads: list[threading.Thread] = []

    def start(drop: tuple[str, ...] = ()) -> tuple[str, ThreadingHTTPServer]:
        handler = functools.partial(_ShardHandler, directory=str(shard_set["out"]))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.drop, server.requests = set(drop), []
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(server)
        threads.append(thread)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(timeout=10)


def _index_only(shard_set, tmp_path: Path) -> Path:
    """A folder holding only index.json: every shard byte must come over the network."""
    folder = tmp_path / "index-only"
    folder.mkdir()
    shutil.copy(shard_set["out"] / "index.json", folder / "index.json")
    return folder


def _curl_children() -> list[int]:
    """Child processes of this test process that are (or were: zombies) curl."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and name == "curl":
            found.append(int(stat.parent.name))
    return found


def _items(batches) -> list[tuple[str, int]]:
    return [(m["key"], int(z)) for b in batches for m, z in zip(b["meta"], b["slice_index"], strict=True)]


def _loader(source, **kw):
    return make_dataloader(source, "train", **({"mode": "2d", "batch_size": 4, "seed": 3, "drop_last": False} | kw))


def test_http_stream_reads_the_same_batches_as_local_files(shard_set, serve, tmp_path: Path) -> None:
    base, server = serve()
    names = [s["name"] for s in json.loads((shard_set["out"] / "index.json").read_text())["splits"]["train"]]
    remote = _loader(_index_only(shard_set, tmp_path), url_template=CURL.format(base=base))
    assert [s.url for s in remote.dataset.shards] == [CURL.format(base=base).replace("{name}", n) for n in names]
    assert _items(remote) == _items(_loader(shard_set["out"]))
    assert sorted(server.requests) == sorted(f"/{n}" for n in names)  # every shard fetched once
    assert remote.corrupt_count == 0
    assert not _curl_children()


def test_connection_dropped_mid_shard_is_skipped_with_one_log_line(shard_set, serve, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    index = json.loads((shard_set["out"] / "index.json").read_text())
    victim = index["splits"]["train"][0]["name"]
    base, server = serve(drop=(victim,))
    url = CURL.format(base=base)
    intact = list(_loader(shard_set["out"]))
    with caplog.at_level(logging.WARNING, logger="brainfm.data.reader"):
        skipping = _loader(_index_only(shard_set, tmp_path), url_template=url)
        batches = list(skipping)
    assert f"/{victim}" in server.requests
    assert len(batches) == len(intact)  # same number of same-size batches as intact data
    assert victim not in {m["shard"] for b in batches for m in b["meta"]}
    assert skipping.corrupt_count == 1
    lines = [r.getMessage() for r in caplog.records if victim in r.getMessage()]
    assert len(lines) == 1 and "corrupt or truncated shard" in lines[0], lines
    assert not _curl_children()


def test_connection_dropped_mid_shard_raises_naming_the_shard(shard_set, serve, tmp_path: Path) -> None:
    victim = json.loads((shard_set["out"] / "index.json").read_text())["splits"]["train"][0]["name"]
    base, _ = serve(drop=(victim,))
    raising = _loader(_index_only(shard_set, tmp_path), url_template=CURL.format(base=base), on_corrupt="raise")
    with pytest.raises(BrainFMInputError, match=f"{victim}.*corrupt or truncated shard"):
        list(raising)
    assert not _curl_children()


def test_server_gone_is_a_corrupt_shard_not_a_hang(shard_set, serve, tmp_path: Path) -> None:
    base, server = serve()
    server.shutdown()
    server.server_close()  # nothing listens on the port any more: curl fails to connect at once
    loader = _loader(_index_only(shard_set, tmp_path), url_template=CURL.format(base=base), on_corrupt="raise")
    with pytest.raises(BrainFMInputError, match="corrupt or truncated shard"):
        list(loader)


def test_url_template_needs_the_name_placeholder(shard_set) -> None:
    from brainfm.config import ConfigError, PretrainConfig, from_dict

    with pytest.raises(BrainFMInputError, match=r"no \{name\} placeholder"):
        _loader(shard_set["out"], url_template="pipe:curl -fsS http://127.0.0.1:1/shard.tar")
    with pytest.raises(ConfigError, match="shard_url"):
        from_dict(PretrainConfig, {"data": {"shard_dir": str(shard_set["out"]), "shard_url": "http://x/a.tar"}})
