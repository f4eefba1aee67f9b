"""Archive download (data/download.py) against a local HTTP server on 127.0.0.1 that speaks like Zenodo."""
import hashlib
import io
import json
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data import download
from data.download import archive_names, download_file, download_ravdess
from data.ravdess import DataError, discover_clips
from tests.shared_paths import REPO

NAME = "Audio_Speech_Actors_01-24.zip"


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


ARCHIVE = make_zip({f"Actor_0{a}/03-01-0{e}-01-01-01-0{a}.wav": bytes(range(256)) * 40
                    for a in (1, 2) for e in (1, 3)})


class Zenodo(ThreadingHTTPServer):
    """Serves /api/records/1188976 and /files/<name>, with range requests and scripted misbehaviour."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = {NAME: ARCHIVE}
        self.md5 = {NAME: hashlib.md5(ARCHIVE).hexdigest()}
        self.cut_after: int | None = None  # drop the connection after this many body bytes, once
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)

    @property
    def record_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/api/records/1188976"


class Handler(BaseHTTPRequestHandler):
    server: Zenodo

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        if self.path.startswith("/api/records/"):
            base = f"http://127.0.0.1:{self.server.server_port}"
            record = {"files": [{"key": k, "size": len(v), "checksum": f"md5:{self.server.md5[k]}",
                                 "links": {"self": f"{base}/files/{k}"}} for k, v in self.server.files.items()]}
            return self.reply(200, json.dumps(record).encode(), {})
        data = self.server.files.get(self.path.removeprefix("/files/"))
        if data is None:
            return self.reply(404, b"", {})
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") and not self.server.ignore_range \
            else 0
        if start >= len(data):
            return self.reply(416, b"", {})
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
        body = data[start:]
        if self.server.cut_after is not None:
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:self.server.cut_after])
            self.server.cut_after = None
            self.close_connection = True
            return
        self.reply(206 if start else 200, body, headers)

    def reply(self, code: int, body: bytes, headers: dict):
        self.send_response(code)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def zenodo(monkeypatch):
    monkeypatch.setattr(download, "RETRY_WAIT", 0.0)
    server = Zenodo()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_download_verifies_extracts_and_skips_on_rerun(zenodo, tmp_path):
    logs: list[str] = []
    download_ravdess(tmp_path, [NAME], zenodo.record_url, progress=False, log=logs.append)
    assert len(discover_clips(tmp_path)) == 4 and not (tmp_path / NAME).exists()  # archive deleted
    assert "4 files extracted" in logs[-1]
    n_requests = len(zenodo.requests)
    download_ravdess(tmp_path, [NAME], zenodo.record_url, progress=False, log=logs.append)
    assert len(zenodo.requests) == n_requests and "already downloaded" in logs[-1]


def test_interrupted_download_resumes_with_a_range_request(zenodo, tmp_path):
    zenodo.cut_after = 3000
    url, md5 = f"http://127.0.0.1:{zenodo.server_port}/files/{NAME}", zenodo.md5[NAME]
    path = download_file(url, tmp_path / NAME, md5, len(ARCHIVE), progress=False)
    assert path.read_bytes() == ARCHIVE and not (tmp_path / f"{NAME}.part").exists()
    assert [r for _, r in zenodo.requests] == [None, "bytes=3000-"]
    # A partial file from an earlier run: only the rest is requested.
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / f"{NAME}.part").write_bytes(ARCHIVE[:5000])
    download_file(url, tmp_path / "again" / NAME, md5, len(ARCHIVE), progress=False)
    assert zenodo.requests[-1][1] == "bytes=5000-" and (tmp_path / "again" / NAME).read_bytes() == ARCHIVE


def test_server_ignoring_the_range_restarts_from_zero(zenodo, tmp_path):
    zenodo.ignore_range = True
    (tmp_path / f"{NAME}.part").write_bytes(ARCHIVE[:5000])
    url = f"http://127.0.0.1:{zenodo.server_port}/files/{NAME}"
    assert download_file(url, tmp_path / NAME, zenodo.md5[NAME], len(ARCHIVE), progress=False).read_bytes() == ARCHIVE


def test_md5_mismatch_deletes_the_download(zenodo, tmp_path):
    zenodo.md5[NAME] = "0" * 32
    with pytest.raises(DataError, match="md5 .* does not match Zenodo's 0000"):
        download_ravdess(tmp_path, [NAME], zenodo.record_url, progress=False, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_unsafe_archive_member_is_refused(zenodo, tmp_path):
    zenodo.files[NAME] = make_zip({"../evil.wav": b"x"})
    zenodo.md5[NAME] = hashlib.md5(zenodo.files[NAME]).hexdigest()
    with pytest.raises(DataError, match="outside"):
        download_ravdess(tmp_path / "dest", [NAME], zenodo.record_url, progress=False, log=lambda _: None)
    assert not (tmp_path / "evil.wav").exists()


def test_offline_and_unknown_archives_give_clear_errors(zenodo, tmp_path):
    with pytest.raises(DataError, match="not in the Zenodo record"):
        download_ravdess(tmp_path, ["Video_Speech_Actor_01.zip"], zenodo.record_url, progress=False)
    closed = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = closed.server_port
    closed.server_close()  # nothing listens there any more
    script = [sys.executable, str(REPO / "data/download.py"), f"--dest={tmp_path}",
              f"--record_url=http://127.0.0.1:{port}/api/records/1188976"]
    run = subprocess.run(script, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: cannot reach") and "download the archives by hand" \
        in run.stderr


def test_archive_names():
    assert archive_names(True, [2, 1, 2]) == [NAME, "Video_Speech_Actor_01.zip", "Video_Speech_Actor_02.zip"]
    assert archive_names(False, 7) == ["Video_Speech_Actor_07.zip"]
    with pytest.raises(DataError, match="1-24"):
        archive_names(True, [25])
