"""Serving speed of the Gradio app: latency at 1 and 16 concurrent clients, and model time.

    python benchmarks/bench_app.py
    python benchmarks/bench_app.py --checkpoint /path/to/checkpoint --requests 40 --clients 1 16

Starts `python app.py` in a subprocess and sends /predict requests through gradio_client
(each one uploads its image, as a browser does), with easy-VQA test images and questions.
Reported per level of concurrency: p50 / p95 latency of a request seen by the client, and
requests/s. Model time: in this process, with the app idle, the Predictor's forward pass
on one prepared request (no image decoding), and a whole Predictor.answer (decoding
included). Goals: model p50 <= 50 ms; p95 at 16 clients <= 3 x the p50 of one client.

--gradio-floor also runs the same load against a Gradio app with the same inputs and output
whose function returns a constant: what Gradio and gradio_client cost with no model at all
(gradio_client checks for each result every 50 ms, so one client's p50 is at least ~50 ms).
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
from vqa.predict import Predictor

DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "easy-vqa"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONSTANT_APP = """
import sys, gradio as gr
with gr.Blocks() as demo:
    image, question, answers, ask = gr.Image(type="filepath"), gr.Textbox(), gr.Label(), gr.Button()
    ask.click(lambda image, question: {"red": 0.9, "blue": 0.1}, [image, question], answers, api_name="predict",
              preprocess=False, concurrency_limit=16)
demo.queue(max_size=256).launch(server_port=int(sys.argv[1]))
"""


def start_app(checkpoint: str | Path | None, port: int | None = None, timeout: float = 180.0,
              extra_args: list[str] | None = None):
    """(process, url) of `python app.py` once it serves, or of CONSTANT_APP when checkpoint is None.

    The server's output goes to a temporary log file.
    """
    port = port or free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="app-", suffix=".log", delete=False)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    if checkpoint is None:
        command = [sys.executable, "-c", CONSTANT_APP, str(port)]
    else:
        command = [sys.executable, "app.py", "--checkpoint", str(checkpoint), "--port", str(port), *(extra_args or [])]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"app.py exited with {process.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"app.py did not serve within {timeout:.0f} s; see {log.name}")


def stop_app(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def easy_vqa_requests(count: int) -> list[tuple[str, str]]:
    """(image path, question) pairs spread over the easy-VQA test split."""
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    step = max(1, len(questions) // count)
    return [(paths[image_ids[i]], questions[i]) for i in range(0, step * count, step)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def model_time(checkpoint, requests: list[tuple[str, str]], repeats: int, threads: int) -> dict[str, float]:
    """Milliseconds: p50 / p95 of the forward pass alone and of a whole Predictor.answer."""
    torch.set_num_threads(threads)  # as the app runs it
    predictor = Predictor.from_checkpoint(checkpoint)
    prepared = [predictor.prepare(image, question) for image, question in requests]
    for request in prepared[:5]:  # warm-up
        predictor.run_prepared([request])
    forward, answer = [], []
    for _ in range(repeats):
        for (image, question), request in zip(requests, prepared):
            start = time.perf_counter()
            predictor.run_prepared([request])
            forward.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            predictor.answer(image, question)
            answer.append((time.perf_counter() - start) * 1000)
    return {"forward_p50": statistics.median(forward), "forward_p95": percentile(forward, 95),
            "answer_p50": statistics.median(answer), "answer_p95": percentile(answer, 95)}


def run_clients(url: str, clients: int, requests: list[tuple[str, str]], per_client: int) -> dict[str, float]:
    """Each client sends per_client requests back to back; latencies in ms."""
    from gradio_client import Client, handle_file

    # ssl_verify=False: plain http on localhost; with it on, httpx loads the CA bundle for each of the
    # client's requests, ~60 ms CPU each, which here would compete with the server for the same cores.
    sessions = [Client(url, verbose=False, ssl_verify=False) for _ in range(clients)]
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(n: int) -> None:
        barrier.wait()
        for k in range(per_client):
            image, question = requests[(n * per_client + k) % len(requests)]
            start = time.perf_counter()
            try:
                sessions[n].predict(handle_file(image), question, api_name="/predict")
            except Exception as error:  # reported, not raised: the benchmark counts them
                with lock:
                    failures.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                latencies.append((time.perf_counter() - start) * 1000)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "failures": len(failures),
            "p50": statistics.median(latencies), "p95": percentile(latencies, 95),
            "per_second": len(latencies) / wall, "first_failure": failures[0] if failures else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--requests", type=int, default=32, help="requests per client and level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--model-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for the model timing and the app")
    parser.add_argument("--gradio-floor", action="store_true", help="also load a Gradio app that runs no model")
    args = parser.parse_args()

    requests = easy_vqa_requests(64)
    model = model_time(args.checkpoint, requests, args.model_repeats, args.threads)
    print(f"model: forward p50 {model['forward_p50']:.1f} ms, p95 {model['forward_p95']:.1f} ms; "
          f"Predictor.answer (with image decoding) p50 {model['answer_p50']:.1f} ms, p95 {model['answer_p95']:.1f} ms")

    def load(checkpoint) -> list[dict]:
        process, url = start_app(checkpoint, extra_args=["--threads", str(args.threads)])
        try:
            run_clients(url, 1, requests, 5)  # warm-up
            return [run_clients(url, clients, requests, args.requests) for clients in args.clients]
        finally:
            stop_app(process)

    def report(name: str, levels: list[dict]) -> None:
        for level in levels:
            print(f"{name}, {level['clients']:>2} clients: {level['requests']} requests, {level['failures']} failed, "
                  f"p50 {level['p50']:.0f} ms, p95 {level['p95']:.0f} ms, {level['per_second']:.1f} requests/s"
                  + (f" (first failure: {level['first_failure']})" if level["failures"] else ""))

    levels = load(args.checkpoint)
    report("app.py", levels)
    if args.gradio_floor:
        report("no-model Gradio app", load(None))

    single = next((level for level in levels if level["clients"] == 1), None)
    busiest = max(levels, key=lambda level: level["clients"])
    print(f"goal model p50 <= 50 ms: {'met' if model['forward_p50'] <= 50 else 'MISSED'} "
          f"({model['forward_p50']:.1f} ms)")
    if single and busiest is not single:
        ratio = busiest["p95"] / single["p50"]
        print(f"goal p95 at {busiest['clients']} clients <= 3 x p50 at 1 client: {'met' if ratio <= 3 else 'MISSED'} "
              f"({ratio:.2f} x)")


if __name__ == "__main__":
    main()
