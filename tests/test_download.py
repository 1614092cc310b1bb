"""vqa/download.py and training/download_vqa_v2.py, against a local HTTP server with the official paths.

The server (stdlib http.server, in a thread) serves small zips under the official names and paths,
honours Range (or ignores it, on request), can cut one response after K bytes, can send slowly,
and records every request with its Range header.
"""

import errno
import hashlib
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from fixtures import ROOT, free_port, wait_until

from vqa import download
from vqa.download import SPLITS, archives_for, mirror_url

SCRIPT = ROOT / "training" / "download_vqa_v2.py"
_spec = importlib.util.spec_from_file_location("download_vqa_v2", SCRIPT)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

QUESTIONS = "/cvmlp/vqa/mscoco/vqa/v2_Questions_Val_mscoco.zip"
ANNOTATIONS = "/cvmlp/vqa/mscoco/vqa/v2_Annotations_Val_mscoco.zip"
IMAGES = "/zips/val2014.zip"


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:  # stored: a flipped byte is a CRC error
        for name, data in files.items():
            z.writestr(name, data)
    return buffer.getvalue()


def val_archives() -> dict[str, bytes]:
    questions = {"questions": [{"image_id": 1, "question": "What is it?", "question_id": 10},
                               {"image_id": 2, "question": "Is it red?", "question_id": 20}]}
    answers = [{"answer": "cat", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]
    annotations = {"annotations": [
        {"question_type": "what is", "multiple_choice_answer": "cat", "answers": answers, "image_id": 1,
         "answer_type": "other", "question_id": 10},
        {"question_type": "is it", "multiple_choice_answer": "cat", "answers": answers, "image_id": 2,
         "answer_type": "yes/no", "question_id": 20}]}
    # Incompressible image bytes, large enough to be cut half-way and sent slowly.
    images = {f"val2014/COCO_val2014_{i:012d}.jpg": hashlib.sha256(bytes([i])).digest() * 3000 for i in (1, 2)}
    return {
        QUESTIONS: zip_bytes({"v2_OpenEnded_mscoco_val2014_questions.json": json.dumps(questions).encode()}),
        ANNOTATIONS: zip_bytes({"v2_mscoco_val2014_annotations.json": json.dumps(annotations).encode()}),
        IMAGES: zip_bytes(images),
    }


class ArchiveServer:
    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cut_after: dict[str, int] = {}  # path -> bytes to send before dropping the connection, once
        self.ignore_range = False
        self.delay_s = 0.0  # per 4 KiB piece: a slow server
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                server.requests.append((self.command, self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                wanted = self.headers.get("Range")
                if wanted and not server.ignore_range and body:
                    start = int(wanted.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                payload = data[start:]
                cut = server.cut_after.pop(self.path, None)
                if cut is not None:
                    payload = payload[:cut]
                for i in range(0, len(payload), 4096):
                    try:
                        self.wfile.write(payload[i:i + 4096])
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    if server.delay_s:
                        time.sleep(server.delay_s)
                if cut is not None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def gets(self, path: str) -> list[str | None]:
        """The Range header of every GET of `path`, in order."""
        return [r for method, p, r in self.requests if method == "GET" and p == path]


@pytest.fixture
def server():
    served = ArchiveServer(val_archives())
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(download, "RETRY_WAITS_S", (0.0, 0.0, 0.0))


def run(root, server_url, *extra) -> int:
    return cli.main(["--root", str(root), "--splits", "val", "--mirror", server_url, "--no-progress", *extra])


# ---------------------------------------------------------------- the table

def test_official_urls_per_split():
    assert [a.url for a in archives_for(["train"])] == [
        "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Questions_Train_mscoco.zip",
        "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Annotations_Train_mscoco.zip",
        "http://images.cocodataset.org/zips/train2014.zip"]
    assert [a.name for a in archives_for(["val"])] == ["v2_Questions_Val_mscoco.zip",
                                                      "v2_Annotations_Val_mscoco.zip", "val2014.zip"]
    test_dev = archives_for(["test-dev"])
    assert [a.name for a in test_dev] == ["v2_Questions_Test_mscoco.zip", "test2015.zip"]
    assert "v2_OpenEnded_mscoco_test-dev2015_questions.json" in test_dev[0].outputs
    assert len(archives_for(list(SPLITS))) == 8  # each archive once
    assert mirror_url("http://images.cocodataset.org/zips/val2014.zip", "http://127.0.0.1:9/") == \
        "http://127.0.0.1:9/zips/val2014.zip"
    assert mirror_url(archives_for(["val"])[0].url, "http://m:8/cache") == \
        "http://m:8/cache/cvmlp/vqa/mscoco/vqa/v2_Questions_Val_mscoco.zip"


# ---------------------------------------------------------------- a whole run

def test_layout_manifest_and_a_second_run_that_does_nothing(tmp_path, server):
    assert run(tmp_path, server.url) == 0
    assert json.loads((tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"][0][
        "question_id"] == 10
    assert len(json.loads((tmp_path / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]) == 2
    for i in (1, 2):
        image = tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg"
        assert image.read_bytes() == hashlib.sha256(bytes([i])).digest() * 3000
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())["archives"]
    for path, data in server.files.items():
        name = path.rsplit("/", 1)[-1]
        assert (tmp_path / name).read_bytes() == data  # the archives are kept
        assert manifest[name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert manifest[name]["size"] == len(data) and manifest[name]["unpacked"] is True
        assert manifest[name]["url"].startswith(("https://s3.amazonaws.com/", "http://images.cocodataset.org/"))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no .partial, no unpacking folder

    before = len(server.requests)
    assert run(tmp_path, server.url) == 0
    assert server.requests[before:] == []  # verified by sha256, unpacked: no request at all


# ---------------------------------------------------------------- resuming

def test_a_dropped_connection_resumes_with_range(tmp_path, server):
    size = len(server.files[IMAGES])
    server.cut_after[IMAGES] = size // 2
    assert run(tmp_path, server.url) == 0
    assert server.gets(IMAGES) == [None, f"bytes={size // 2}-"]
    assert (tmp_path / "val2014.zip").read_bytes() == server.files[IMAGES]
    assert (tmp_path / "val2014" / "COCO_val2014_000000000002.jpg").is_file()


def test_a_server_that_ignores_range_restarts_the_file(tmp_path, server):
    data = server.files[IMAGES]
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "val2014.zip.part").write_bytes(data[:1000])
    server.ignore_range = True
    assert run(tmp_path, server.url) == 0
    assert server.gets(IMAGES) == ["bytes=1000-"]  # asked to resume, was sent the whole file (200)
    assert (tmp_path / "val2014.zip").read_bytes() == data


def test_a_complete_partial_file_is_finished_without_its_bytes_again(tmp_path, server):
    data = server.files[IMAGES]
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "val2014.zip.part").write_bytes(data)  # killed between the last byte and the rename
    assert run(tmp_path, server.url) == 0
    assert server.gets(IMAGES) == [f"bytes={len(data)}-"]  # 416 with the total: complete
    assert (tmp_path / "val2014.zip").read_bytes() == data


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_a_stopped_script_resumes_where_it_stopped(tmp_path, server, stop):
    server.delay_s = 0.03  # about 1.5 s for the image zip: time to stop it half-way
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--root", str(tmp_path), "--splits", "val",
                                "--mirror", server.url, "--no-progress"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = tmp_path / ".partial" / "val2014.zip.part"
    try:
        wait_until(lambda: part.is_file() and part.stat().st_size > 20_000, 60, "the image zip never started")
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    kept = part.stat().st_size
    assert 20_000 < kept < len(server.files[IMAGES])
    if stop == signal.SIGINT:
        assert process.returncode == 130
        assert str(part) in stderr and "resume" in stderr and f"{kept:,} bytes" in stderr
    else:
        assert process.returncode == -signal.SIGKILL

    server.delay_s = 0.0
    assert run(tmp_path, server.url) == 0
    assert server.gets(IMAGES)[-1] == f"bytes={kept}-"
    assert (tmp_path / "val2014.zip").read_bytes() == server.files[IMAGES]
    assert len(server.gets(QUESTIONS)) == 1  # finished in the first run, verified, not fetched again


# ---------------------------------------------------------------- verification

def test_a_corrupted_archive_is_found_by_its_sha256_and_fetched_again_alone(tmp_path, server, capsys):
    assert run(tmp_path, server.url) == 0
    archive = tmp_path / "val2014.zip"
    damaged = bytearray(archive.read_bytes())
    damaged[len(damaged) // 3] ^= 0xFF
    archive.write_bytes(bytes(damaged))
    capsys.readouterr()

    assert run(tmp_path, server.url) == 0
    assert "val2014.zip: its sha256 differs" in capsys.readouterr().out
    assert archive.read_bytes() == server.files[IMAGES]
    assert len(server.gets(IMAGES)) == 2
    assert len(server.gets(QUESTIONS)) == 1 and len(server.gets(ANNOTATIONS)) == 1


def test_an_archive_corrupt_twice_is_an_error_naming_it(tmp_path, server, capsys):
    damaged = bytearray(server.files[IMAGES])
    damaged[len(damaged) // 3] ^= 0xFF  # inside a stored member: a CRC error
    server.files[IMAGES] = bytes(damaged)
    assert run(tmp_path, server.url) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: archive ")
    assert str(tmp_path / "val2014.zip") in lines[0] and "CRC" in lines[0]
    assert len(server.gets(IMAGES)) == 2  # downloaded again once, then given up
    assert not (tmp_path / "val2014").exists() and not (tmp_path / "val2014.zip").exists()


# ---------------------------------------------------------------- one-line errors

def test_404_names_the_url(tmp_path, server, capsys):
    del server.files[ANNOTATIONS]
    assert run(tmp_path, server.url) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err == f"error: not found (HTTP 404): {server.url}{ANNOTATIONS}\n"


def test_no_server_names_the_host(tmp_path, capsys):
    port = free_port()  # nothing listens there
    assert cli.main(["--root", str(tmp_path), "--splits", "test-dev", "--mirror", f"http://127.0.0.1:{port}",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot reach 127.0.0.1:{port}: ")


def test_not_enough_disk_space_is_refused_with_the_numbers(tmp_path, server, monkeypatch, capsys):
    needed = 2 * sum(len(data) for data in server.files.values())
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: SimpleNamespace(free=needed - 1))
    assert run(tmp_path, server.url) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not enough free disk space" in err
    assert f"({needed:,} bytes)" in err and f"({needed - 1:,} bytes) are free" in err
    assert [method for method, _, _ in server.requests] == ["HEAD"] * 3  # sizes asked, nothing downloaded


def test_a_full_disk_names_the_folder(tmp_path, server, monkeypatch, capsys):
    real_open = Path.open

    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: FullDisk() if self.suffix == ".part"
                        else real_open(self, *a, **k))
    assert run(tmp_path, server.url) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: disk full while downloading v2_Questions_Val_mscoco.zip into ")
    assert str(tmp_path / ".partial") in err
