"""A load client that costs little CPU: one asyncio process holding N connections to a Gradio
app, speaking Gradio's queue protocol directly over httpx (a gradio dependency).

    python benchmarks/queue_client.py http://127.0.0.1:7860/ --model easy-vqa --image IMG --question "what shape is it?"
    python benchmarks/queue_client.py URL --model easy-vqa --image IMG --question Q --clients 16 --duration 10 \
        --then explain --server-pid PID

The protocol (protocol "sse_v3"; gradio/routes.py queue_join and queue_data, gradio_client/client.py
send_data and stream_messages):
1. POST {api_prefix}/upload, multipart field "files" -> the server's path of each file; an image
   input is then {"path": that path, "orig_name": ..., "meta": {"_type": "gradio.FileData"}}.
2. POST {api_prefix}/queue/join {"data", "event_data", "fn_index", "trigger_id", "session_hash"}
   -> {"event_id"}; fn_index is the event's "id" in GET /config (its api_name says which).
   The body is the one the browser sends; 503 when the queue is full.
3. GET {api_prefix}/queue/data?session_hash=...: server-sent events, "data: {json}", for the
   session's events: estimation, process_starts, then process_completed carrying
   {"data": [outputs]}, or success false and {"error": message} (a gr.Error; null for a crash
   when show_error is off). Once the session has no event left the server sends close_stream
   and ends the stream. The stream exists only after a join (404 before), so a call joins first,
   then reads; messages sent in between wait in the session's queue on the server.
Each client is one session (a browser tab) asking one question at a time; a chain such as
predict -> explain joins the next event after the previous one succeeded, as the browser
runs `.success()` events.

Why not gradio_client: per call it runs 2 to 3 threads that poll for messages every 50 ms (so
one client's latency is at least ~50 ms) and uploads the image again, and its client threads
compete with the server for the same cores. Against bench_app.py's no-model app, 1 client, on
2 shared cores: gradio_client p50 60 ms, 6.9 ms of client CPU per request; this client p50
8.9 ms, 3.8 ms of CPU (mostly httpx and anyio; the server spent 9.7 ms).
"""

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile by the nearest rank (no interpolation)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time a process has used so far."""
    times = process.cpu_times()
    return times.user + times.system


class QueueError(Exception):
    """The queue did not deliver a result: a refused join, a broken or cut stream."""


@dataclass
class Result:
    """One request (a chain of events) as the client saw it."""

    tag: object  # what the caller said the request is (e.g. "good", or a bad input's name)
    ok: bool  # every event of the chain completed with success
    latency_ms: float  # from the first join to the last process_completed (uploads not included)
    error: str | None = None  # the app's message, or what went wrong on the way
    refused: bool = False  # the app answered with a message (gr.Error): not a crash, not a transport failure
    output: list | None = None  # the last event's outputs


@dataclass
class Run:
    results: list[Result]
    wall_s: float
    client_cpu_s: float  # this process, all threads (time.process_time)
    server_cpu_s: float | None  # the server process, when its pid was given

    def latencies(self, tag=None) -> list[float]:
        return [r.latency_ms for r in self.results if r.ok and (tag is None or r.tag == tag)]

    def summary(self) -> dict:
        """p50 / p95 (ms) of the successful requests, requests/s, failures and CPU ms per request."""
        latencies, count = self.latencies(), len(self.results)
        failures = [r for r in self.results if not r.ok]
        return {"requests": count, "failures": len(failures),
                "first_failure": failures[0].error if failures else "",
                "p50": statistics.median(latencies) if latencies else float("nan"),
                "p95": percentile(latencies, 95) if latencies else float("nan"),
                "per_second": count / self.wall_s,
                "client_cpu_ms": 1000 * self.client_cpu_s / max(count, 1),
                "server_cpu_ms": 1000 * self.server_cpu_s / max(count, 1) if self.server_cpu_s is not None else None}


class QueueClient:
    """One Gradio app's queue over one pool of keep-alive connections."""

    def __init__(self, url: str, connections: int = 16, timeout: float = 120.0):
        self.url = url.rstrip("/") + "/"
        self.http = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(
            max_connections=connections, max_keepalive_connections=connections))
        self.prefix = ""
        self.fn_index: dict[str, int] = {}  # api_name -> the event's id
        self._uploads: dict[Path, dict] = {}

    async def __aenter__(self) -> "QueueClient":
        response = await self.http.get(self.url + "config")
        response.raise_for_status()
        config = response.json()
        if config.get("protocol") not in ("sse_v2", "sse_v2.1", "sse_v3"):
            raise QueueError(f"the app speaks protocol {config.get('protocol')!r}, not sse_v2/v3")
        self.prefix = self.url + config.get("api_prefix", "/gradio_api").strip("/") + "/"
        self.fn_index = {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def upload(self, path: Path, again: bool = False) -> dict:
        """The FileData of a local file uploaded to the server (once, unless again)."""
        if not again and path in self._uploads:
            return self._uploads[path]
        response = await self.http.post(self.prefix + "upload", files=[("files", (path.name, path.read_bytes()))])
        if response.status_code != 200:
            raise QueueError(f"upload of {path.name} answered {response.status_code}: {response.text[:200]}")
        data = {"path": response.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
        self._uploads[path] = data
        return data

    async def inputs(self, values: Sequence, upload_again: bool = False) -> list:
        """The event's data: each Path uploaded and replaced by its FileData, other values as they are."""
        return [await self.upload(v, upload_again) if isinstance(v, Path) else v for v in values]

    async def call(self, session_hash: str, api_name: str, data: list) -> tuple[dict, float]:
        """(process_completed message, time.perf_counter() when it arrived) of one event."""
        if api_name not in self.fn_index:
            raise QueueError(f"no event named {api_name!r}; the app has {', '.join(self.fn_index)}")
        join = await self.http.post(self.prefix + "queue/join", json={
            "data": data, "event_data": None, "fn_index": self.fn_index[api_name], "trigger_id": None,
            "session_hash": session_hash})
        if join.status_code != 200:
            raise QueueError(f"queue/join answered {join.status_code}: {join.text[:200]}")
        event_id = join.json()["event_id"]
        completed, arrived = None, 0.0
        async with self.http.stream("GET", self.prefix + "queue/data", params={"session_hash": session_hash}) as stream:
            if stream.status_code != 200:
                raise QueueError(f"queue/data answered {stream.status_code}")
            # Read on to close_stream (right after), so that the connection goes back to the pool.
            async for line in stream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                    completed, arrived = message, time.perf_counter()
                elif message.get("msg") == "unexpected_error":
                    raise QueueError(f"unexpected_error: {message.get('message')}")
        if completed is None:
            raise QueueError("the stream ended before process_completed")
        return completed, arrived

    async def ask(self, session_hash: str, chain: Sequence[str], data: list, tag=None) -> Result:
        """Run the events of `chain` one after the other on the same inputs, stopping at a failure."""
        start = time.perf_counter()
        message, end = {}, start
        for api_name in chain:
            try:
                message, end = await self.call(session_hash, api_name, data)
            except (QueueError, httpx.HTTPError) as error:
                return Result(tag, False, (time.perf_counter() - start) * 1000, f"{type(error).__name__}: {error}")
            if not message.get("success", True):
                error = (message.get("output") or {}).get("error")
                return Result(tag, False, (end - start) * 1000, error or f"/{api_name} failed without a message",
                              refused=bool(error))
        return Result(tag, True, (end - start) * 1000, output=message["output"].get("data"))


Request = tuple[object, Sequence]  # (tag, the event's inputs; a Path stands for a file to upload)


async def drive(url: str, clients: int, next_request: Callable[[int, int], Request], *, per_client: int | None = None,
                duration: float | None = None, chain: Sequence[str] = ("predict",), upload_again: bool = False,
                server_pid: int | None = None) -> Run:
    """`clients` sessions asking back to back, each per_client times or until `duration` seconds passed.

    next_request(client, k) gives client's k-th request. Files are uploaded before their
    request's clock starts: once per path, or before every request with upload_again (as a
    browser does for each image chosen). A failed upload is a failed request.
    """
    if per_client is None and duration is None:
        raise ValueError("give per_client, duration or both")
    server = psutil.Process(server_pid) if server_pid else None
    results: list[Result] = []
    stop_at = None
    async with QueueClient(url, connections=clients + 2) as queue:
        async def client(n: int) -> None:
            session = uuid.uuid4().hex
            k = 0
            while (per_client is None or k < per_client) and (stop_at is None or time.monotonic() < stop_at):
                tag, values = next_request(n, k)
                k += 1
                try:
                    data = await queue.inputs(values, upload_again)
                except (QueueError, httpx.HTTPError) as error:
                    results.append(Result(tag, False, 0.0, f"{type(error).__name__}: {error}",
                                          refused=isinstance(error, QueueError)))
                    continue
                results.append(await queue.ask(session, chain, data, tag))

        server_before = cpu_seconds(server) if server else None
        cpu_before, began = time.process_time(), time.perf_counter()
        if duration is not None:
            stop_at = time.monotonic() + duration
        await asyncio.gather(*(client(n) for n in range(clients)))
        wall, client_cpu = time.perf_counter() - began, time.process_time() - cpu_before
        server_cpu = cpu_seconds(server) - server_before if server else None
    return Run(results, wall, client_cpu, server_cpu)


def run(url: str, clients: int, next_request: Callable[[int, int], Request], **options) -> Run:
    """drive() in a fresh event loop."""
    return asyncio.run(drive(url, clients, next_request, **options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the app, e.g. http://127.0.0.1:7860/")
    parser.add_argument("--model", required=True, help="the model's name in the app (its checkpoint folder's name)")
    parser.add_argument("--image", type=Path, action="append", required=True, help="image file (repeat for several)")
    parser.add_argument("--question", action="append", required=True, help="question (repeat for several)")
    parser.add_argument("--clients", type=int, default=1, help="concurrent sessions")
    parser.add_argument("--requests", type=int, default=None, help="requests per client")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of load (without it nor --requests: 20 requests per client)")
    parser.add_argument("--then", action="append", default=[], help="event chained after /predict, e.g. explain")
    parser.add_argument("--server-pid", type=int, default=None, help="the server's pid, to report its CPU time")
    args = parser.parse_args()
    pairs = [(image, question) for image in args.image for question in args.question]
    per_client = args.requests if args.requests or args.duration else 20

    def next_request(n: int, k: int) -> Request:
        image, question = pairs[(n + k) % len(pairs)]
        return "request", [args.model, image, question]

    result = run(args.url, args.clients, next_request, per_client=per_client, duration=args.duration,
                 chain=["predict", *args.then], server_pid=args.server_pid)
    s = result.summary()
    print(f"{args.clients} clients, {' -> '.join(['predict', *args.then])}: {s['requests']} requests, "
          f"{s['failures']} failed, p50 {s['p50']:.1f} ms, p95 {s['p95']:.1f} ms, {s['per_second']:.1f} requests/s, "
          f"client CPU {s['client_cpu_ms']:.1f} ms per request"
          + (f", server CPU {s['server_cpu_ms']:.1f} ms per request" if s["server_cpu_ms"] is not None else "")
          + (f" (first failure: {s['first_failure']})" if s["failures"] else ""))


if __name__ == "__main__":
    main()
