"""Load test of the Gradio app: concurrent clients mixing good and bad requests for a while.

    python benchmarks/load_app.py
    python benchmarks/load_app.py --clients 16 --duration 60 --bad-fraction 0.25 --checkpoint DIR

Starts `python app.py` and runs --clients sessions of benchmarks/queue_client.py (one asyncio
process, cheap for the client) for --duration seconds, each asking /predict (model name,
image, question) back to back and uploading its image with every request, as a browser does
for each image chosen. Each request is, at random (seeded), a good one (an easy-VQA test
image and question) or one of BAD_REQUESTS: bad questions, no image, an unknown model, and
files that are corrupt, empty, claim 20000 x 20000 pixels, or are real PNGs of 1 x 300,000,
300,000 x 1 and 1 x 100,000 pixels (about 1 KB each).
Reported: good requests that failed (goal 0); bad requests answered instead of refused with a
message (goal 0), and refusals whose message is not the expected one; p50 / p95 latency of
good requests; the CPU time per request of the client and of the server; the server's
resident memory: its peak (sampled every 0.2 s, and VmHWM, the kernel's high-water mark since
the process started, model loading included), after a warm-up at full concurrency, every
tenth of the run and at the end (goal: growth from warm-up to the end < 10 %).

    python benchmarks/load_app.py --fairness --duration 20 --checkpoint checkpoints/shapes-world-attention

measures instead one user's p95 asking (/predict) and asking every model (/compare), alone and
beside one client that floods the queue with heatmap (/explain) requests (goal: at most 2x).
"""

import argparse
import asyncio
import io
import random
import statistics
import struct
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import psutil
from bench_app import DEFAULT_CHECKPOINT, easy_vqa_requests, start_app, stop_app
from PIL import Image
from queue_client import QueueClient, Request, percentile, run

from vqa.predict import MAX_QUESTION_CHARS

MIB = 1024 * 1024
SAMPLE_EVERY_S = 0.2


def claiming_png(width: int, height: int) -> bytes:
    """A few hundred bytes whose PNG header claims width x height pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def real_png(width: int, height: int) -> bytes:
    """A valid one-colour PNG: 1 x 300,000 compresses to about 1.2 KB."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def bad_files(folder: Path) -> dict[str, Path]:
    files = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n and then nothing like an image",
        "empty.png": b"",
        "claims-20000x20000.png": claiming_png(20000, 20000),
        "1x300000.png": real_png(1, 300_000),
        "300000x1.png": real_png(300_000, 1),
        "1x100000.png": real_png(1, 100_000),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return {name: folder / name for name in files}


def bad_requests(folder: Path, model: str, image: Path, question: str) -> dict[str, tuple[list, str]]:
    """name -> (the /predict inputs, a fragment of the message the app must refuse them with)."""
    files = bad_files(folder)
    return {
        "empty question": ([model, image, ""], "question is empty"),
        "blank question": ([model, image, "   "], "question is empty"),
        "over-long question": ([model, image, "x" * (MAX_QUESTION_CHARS + 1)],
                               f"over the limit of {MAX_QUESTION_CHARS}"),
        "NUL byte in the question": ([model, image, "what\x00color"], "NUL byte"),
        "question not text": ([model, image, 42], "must be text"),
        "no image": ([model, None, question], "no image"),
        "unknown model": (["no-such-model", image, question], "no model named"),
        **{name: ([model, path, question], fragment) for name, path, fragment in [
            ("corrupt file", files["corrupt.png"], "not a readable image"),
            ("empty file", files["empty.png"], "empty (0 bytes)"),
            ("header claiming 20000 x 20000", files["claims-20000x20000.png"], "pixels"),
            ("1 x 300000 PNG", files["1x300000.png"], "aspect ratio"),
            ("300000 x 1 PNG", files["300000x1.png"], "aspect ratio"),
            ("1 x 100000 PNG", files["1x100000.png"], "aspect ratio"),
        ]},
    }


class MemorySampler(threading.Thread):
    """Samples a process's resident memory every SAMPLE_EVERY_S seconds until stopped."""

    def __init__(self, process: psutil.Process):
        super().__init__(daemon=True)
        self.process = process
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), rss)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append((time.monotonic(), self.process.memory_info().rss))
            except psutil.Error:
                return
            self._stop_event.wait(SAMPLE_EVERY_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def peak(self, since: float = 0.0) -> int:
        return max((rss for t, rss in self.samples if t >= since), default=0)


def high_water_mark(pid: int) -> int | None:
    """VmHWM from /proc/PID/status in bytes: the peak resident memory over the process's life (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


async def _flood(url: str, data: list, stop: threading.Event, counts: Counter) -> None:
    """One session joining heatmap (/explain) events as fast as the server answers, never waiting for them."""
    async with QueueClient(url, connections=4) as queue:
        fields = {"data": await queue.inputs(data), "event_data": None, "fn_index": queue.fn_index["explain"],
                  "trigger_id": None, "session_hash": "flooding-session"}
        while not stop.is_set():
            counts[(await queue.http.post(queue.prefix + "queue/join", json=fields)).status_code] += 1
            await asyncio.sleep(0.01)


def fairness(url: str, model: str, image, question: str, duration: float) -> None:
    """A normal user's p95 asking, and asking every model, alone and beside a client flooding the
    queue with heatmap requests (goal: at most 2x)."""
    for chain, data in ((("predict",), [model, image, question]), (("compare",), [image, question])):
        alone = run(url, 1, lambda n, k: ("good", data), duration=duration, chain=chain)
        stop, counts = threading.Event(), Counter()
        flooder = threading.Thread(target=lambda: asyncio.run(_flood(url, [model, image, question], stop, counts)))
        flooder.start()
        time.sleep(2)  # the flood fills its share first
        flooded = run(url, 1, lambda n, k: ("good", data), duration=duration, chain=chain)
        stop.set()
        flooder.join()
        time.sleep(5)  # the flood's accepted heatmaps drain before the next measurement
        a, f = percentile(alone.latencies("good"), 95), percentile(flooded.latencies("good"), 95)
        failed = sum(not r.ok for r in flooded.results)
        print(f"/{chain[0]}: p95 alone {a:.0f} ms ({len(alone.results)} requests), beside the flood {f:.0f} ms "
              f"({len(flooded.results)} requests, {failed} failed): {f / a:.2f}x (goal <= 2x); the flood's joins: "
              f"{counts[200]} accepted, {counts[503]} refused")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="checkpoint folder app.py serves")
    parser.add_argument("--clients", type=int, default=16, help="concurrent sessions")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--bad-fraction", type=float, default=0.25, help="share of bad requests")
    parser.add_argument("--seed", type=int, default=0, help="seed of each client's choice of requests")
    parser.add_argument("--fairness", action="store_true",
                        help="instead: one user's p95 alone and beside a client flooding the queue")
    args = parser.parse_args()

    model = Path(args.checkpoint).name  # app.py names each model by its checkpoint folder
    good = easy_vqa_requests(256)
    bad = bad_requests(Path(tempfile.mkdtemp(prefix="vqa-load-")), model, *good[0])
    bad_names = sorted(bad)
    rngs = [random.Random(args.seed * 1000 + n) for n in range(args.clients)]

    def good_request(n: int, k: int) -> Request:
        image, question = good[(n * 16 + k) % len(good)]
        return "good", [model, image, question]

    def mixed_request(n: int, k: int) -> Request:
        rng = rngs[n]
        if rng.random() < args.bad_fraction:
            name = rng.choice(bad_names)
            return name, bad[name][0]
        return "good", [model, *rng.choice(good)]

    process, url = start_app(args.checkpoint)
    if args.fairness:
        try:
            fairness(url, model, *good[0], args.duration)
        finally:
            stop_app(process)
        return
    server = psutil.Process(process.pid)
    sampler = MemorySampler(server)
    sampler.start()
    try:
        rss_start = server.memory_info().rss
        # Warm-up at full concurrency: every worker thread and batch size has run once.
        run(url, args.clients, good_request, per_client=4, upload_again=True)
        rss_warm, warm_at = server.memory_info().rss, time.monotonic()
        load = run(url, args.clients, mixed_request, duration=args.duration, upload_again=True, server_pid=process.pid)
        rss_end = server.memory_info().rss
        hwm = high_water_mark(process.pid)
        alive = process.poll() is None
    finally:
        sampler.stop()
        stop_app(process)

    results = load.results
    good_results = [r for r in results if r.tag == "good"]
    good_failures = [r for r in good_results if not r.ok]
    latencies = load.latencies("good")
    print(f"{args.clients} clients for {load.wall_s:.0f} s: {len(results)} requests "
          f"({len(results) / load.wall_s:.1f}/s), {len(good_results)} good, {len(results) - len(good_results)} bad; "
          f"CPU per request: "
          f"client {1000 * load.client_cpu_s / len(results):.1f} ms, "
          f"server {1000 * load.server_cpu_s / len(results):.1f} ms")
    first = f"; first: {good_failures[0].error}" if good_failures else ""
    print(f"good requests failed: {len(good_failures)} (goal 0){first}")
    if latencies:
        print(f"good request latency: p50 {statistics.median(latencies):.0f} ms, "
              f"p95 {percentile(latencies, 95):.0f} ms")

    outcomes: dict[str, Counter] = {name: Counter() for name in bad_names}
    examples: dict[str, str] = {}
    for r in results:
        if r.tag == "good":
            continue
        fragment = bad[r.tag][1]
        outcome = ("answered" if r.ok else "expected" if r.refused and fragment in r.error
                   else "other message" if r.refused else "no message")
        outcomes[r.tag][outcome] += 1
        if outcome != "answered":
            examples.setdefault(r.tag, r.error)
    total = Counter()
    for counts in outcomes.values():
        total.update(counts)
    print(f"bad requests: {total['expected']} refused with the expected message, {total['other message']} refused "
          f"with another message, {total['answered']} answered instead of refused (goal 0), {total['no message']} "
          f"failed without a message (goal 0)")
    for name in bad_names:
        counts = outcomes[name]
        print(f"  {name}: {sum(counts.values())} sent, {counts['expected']} refused as expected"
              + "".join(f", {counts[k]} {k}" for k in ("other message", "answered", "no message") if counts[k])
              + (f" ({examples[name][:150]!r})" if name in examples else ""))

    growth = (rss_end - rss_warm) / rss_warm * 100
    peak_load = sampler.peak(since=warm_at)
    print(f"server resident memory: {rss_start / MIB:.0f} MiB serving, {rss_warm / MIB:.0f} MiB after warm-up, "
          f"{rss_end / MIB:.0f} MiB at the end: {growth:+.1f} % since warm-up (goal < 10 %)")
    print(f"server peak resident memory: {sampler.peak() / MIB:.0f} MiB sampled every {SAMPLE_EVERY_S} s "
          f"({peak_load / MIB:.0f} MiB during the load); VmHWM "
          + (f"{hwm / MIB:.0f} MiB (since the process started, model loading included)" if hwm else "unavailable"))
    tenths = [max((rss for t, rss in sampler.samples if warm_at + i * load.wall_s / 10 <= t
                   < warm_at + (i + 1) * load.wall_s / 10), default=0) for i in range(10)]
    print("server peak resident memory in each tenth of the run (MiB): "
          + " ".join(f"{r / MIB:.0f}" for r in tenths))
    print(f"server still running at the end: {alive}")


if __name__ == "__main__":
    main()
