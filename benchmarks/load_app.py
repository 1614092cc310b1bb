"""Load test of the Gradio app: concurrent clients mixing good and bad requests for a while.

    python benchmarks/load_app.py
    python benchmarks/load_app.py --clients 16 --duration 60 --bad-fraction 0.25 --checkpoint DIR

Starts `python app.py` and runs --clients gradio_client sessions for --duration seconds. Each
request is, at random (seeded), a good one (an easy-VQA test image and question) or a bad
one (empty or over-long question, NUL byte, corrupt, empty or 20000x20000 image, no image).
Reported: failures of good requests (goal 0) and bad requests that were answered instead of
refused (goal 0), p50 / p95 latency of good requests, requests/s, and the server process's
resident memory once it serves, after a warm-up, every tenth of the run and at the end
(goal: growth < 10 %).
"""

import argparse
import random
import statistics
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

import psutil

from bench_app import DEFAULT_CHECKPOINT, easy_vqa_requests, percentile, run_clients, start_app, stop_app


def bad_files(folder: Path) -> dict[str, Path]:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    huge_header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    files = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n and then nothing like an image",
        "empty.png": b"",
        "huge.png": b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", huge_header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b""),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return {name: folder / name for name in files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--bad-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    good = easy_vqa_requests(256)
    bad_dir = Path(tempfile.mkdtemp(prefix="vqa-load-"))
    bad = bad_files(bad_dir)
    image = good[0][0]
    bad_requests = [(image, ""), (image, "   "), (image, "x" * 301), (image, "what\x00color"), (None, good[0][1]),
                    (bad["corrupt.png"], good[0][1]), (bad["empty.png"], good[0][1]), (bad["huge.png"], good[0][1])]

    process, url = start_app(args.checkpoint)
    server = psutil.Process(process.pid)
    try:
        rss_start = server.memory_info().rss
        # Warm-up at full concurrency: every worker thread and batch size has run once.
        run_clients(url, args.clients, good, 4)
        rss_warm = server.memory_info().rss

        sessions = [Client(url, verbose=False, ssl_verify=False) for _ in range(args.clients)]
        latencies: list[float] = []
        good_failures: list[str] = []
        bad_answered: list[str] = []
        bad_refused = 0
        lock = threading.Lock()
        stop_at = time.monotonic() + args.duration

        def client(n: int) -> None:
            nonlocal bad_refused
            rng = random.Random(args.seed * 1000 + n)
            while time.monotonic() < stop_at:
                is_bad = rng.random() < args.bad_fraction
                path, question = rng.choice(bad_requests if is_bad else good)
                start = time.perf_counter()
                try:
                    sessions[n].predict(handle_file(path) if path else None, question, api_name="/predict")
                except AppError as error:
                    with lock:
                        if is_bad:
                            bad_refused += 1
                        else:
                            good_failures.append(f"{Path(path).name} {question!r}: {error}")
                    continue
                except Exception as error:  # a transport failure: counted against good and bad alike
                    with lock:
                        (bad_answered if is_bad else good_failures).append(f"{type(error).__name__}: {error}")
                    continue
                with lock:
                    if is_bad:
                        bad_answered.append(f"{question[:20]!r} on {path}")
                    else:
                        latencies.append((time.perf_counter() - start) * 1000)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        rss_series = []  # every tenth of the run: a leak keeps climbing, a warm-up levels off
        while any(thread.is_alive() for thread in threads):
            time.sleep(min(1.0, args.duration / 10))
            if len(rss_series) < 10 and time.perf_counter() - began >= (len(rss_series) + 1) * args.duration / 10:
                rss_series.append(server.memory_info().rss)
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        rss_end = server.memory_info().rss
        alive = process.poll() is None
    finally:
        stop_app(process)

    mib = 1024 * 1024
    total = len(latencies) + len(good_failures) + len(bad_answered) + bad_refused
    print(f"{args.clients} clients for {wall:.0f} s: {total} requests ({total / wall:.1f}/s), "
          f"{len(latencies) + len(good_failures)} good, {len(bad_answered) + bad_refused} bad")
    first = f"; first: {good_failures[0]}" if good_failures else ""
    print(f"good requests failed: {len(good_failures)} (goal 0){first}")
    print(f"bad requests refused with a message: {bad_refused}; answered instead: {len(bad_answered)} (goal 0)")
    if latencies:
        print(f"good request latency: p50 {statistics.median(latencies):.0f} ms, "
              f"p95 {percentile(latencies, 95):.0f} ms")
    growth = (rss_end - rss_warm) / rss_warm * 100
    print(f"server resident memory: {rss_start / mib:.0f} MiB serving, {rss_warm / mib:.0f} MiB after warm-up, "
          f"{rss_end / mib:.0f} MiB at the end: {growth:+.1f} % since warm-up (goal < 10 %)")
    print("server resident memory every tenth of the run (MiB): " + " ".join(f"{r / mib:.0f}" for r in rss_series))
    print(f"server still running at the end: {alive}")


if __name__ == "__main__":
    main()
