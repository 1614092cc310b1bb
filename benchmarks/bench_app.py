"""Serving speed of the Gradio app against the same app with no model, at 1 and 16 concurrent clients.

    python benchmarks/bench_app.py
    python benchmarks/bench_app.py --checkpoint /path/to/checkpoint --duration 15 --clients 1 16 --client async

Starts `python app.py` and, beside it, CONSTANT_APP: a Gradio app with the same events,
inputs, outputs and queue settings whose functions return constants, so that its latency is
what Gradio alone costs (the floor). Both are loaded the same way, turn about, for --duration
seconds per measurement, with easy-VQA test images and questions:
- "/predict" alone (model name, image, question -> answers, notice, details), and
- "/predict" then "/explain" (the occlusion heatmap), chained as the browser runs them (the
  browser then also runs "/attention", which returns at once for a pooled model: left out).
Reported per level of concurrency: p50 / p95 latency seen by the client, requests/s, and the
CPU time per request of the client process and of the server process.

Goals: model forward p50 <= 50 ms; p95(app) / p95(floor) <= 1.2 for /predict at each level.

--client async (default): benchmarks/queue_client.py, one asyncio process speaking Gradio's
queue protocol; each image is uploaded once (as a browser does when an image is chosen,
before asking), and the upload is not in the latency. --client gradio_client: one
gradio_client.Client per client thread, which uploads the image with every call and polls
for the result every 50 ms (so one client's p50 is at least ~50 ms).
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

import psutil
import torch
from queue_client import Request, Result, Run, cpu_seconds, percentile, run

from vqa.predict import Predictor

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "easy-vqa"
GOAL_RATIO = 1.2  # p95(app) / p95(floor) for /predict


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The floor: app.py's Ask tab with constant functions. Same components in and out, same
# preprocess=False, concurrency limits and ids, queue size, api_open=False, file size limit and
# show_error; "/explain" returns a 256 x 256 PNG like app.py's overlay of an easy-VQA image.
CONSTANT_APP = """
import sys
import gradio as gr
from PIL import Image

port, model = int(sys.argv[1]), sys.argv[2]
ANSWERS = {"circle": 0.91, "rectangle": 0.05, "triangle": 0.02, "red": 0.01, "blue": 0.01}
DETAILS = {"answer": "circle", "confidence": 0.91, "not_sure": False, "confidence_threshold": 0.5,
           "unusual_image": False, "image_score": -1.0, "image_threshold": 10.0, "unknown_words": []}
OVERLAY = Image.radial_gradient("L").convert("RGB")

with gr.Blocks() as demo:
    name = gr.Dropdown([model], value=model, label="Model")
    image = gr.Image(type="filepath", label="Image")
    question = gr.Textbox(label="Question")
    ask = gr.Button("Ask")
    notice = gr.Markdown()
    answers = gr.Label(num_top_classes=5)
    details = gr.JSON(visible=False)
    heatmap = gr.Image(type="pil", interactive=False, format="png")
    inputs = [name, image, question]
    gr.on([ask.click, question.submit], lambda name, image, question: (ANSWERS, "", DETAILS), inputs,
          [answers, notice, details], api_name="predict", preprocess=False, concurrency_limit=16,
          concurrency_id="predict") \\
        .success(lambda name, image, question: OVERLAY, inputs, heatmap, api_name="explain", preprocess=False,
                 concurrency_limit=2, concurrency_id="explain")
demo.queue(max_size=256, api_open=False).launch(server_port=port, max_file_size="50mb", show_error=False)
"""


def start_app(checkpoint: str | Path | None, port: int | None = None, timeout: float = 180.0,
              extra_args: list[str] | None = None, model: str = "easy-vqa"):
    """(process, url) of `python app.py` once it serves, or of CONSTANT_APP serving `model` when
    checkpoint is None. The server's output goes to a temporary log file."""
    port = port or free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="app-", suffix=".log", delete=False)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    if checkpoint is None:
        command = [sys.executable, "-c", CONSTANT_APP, str(port), model]
    else:
        command = [sys.executable, "app.py", "--checkpoint", str(checkpoint), "--port", str(port), *(extra_args or [])]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[1]} exited with {process.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{command[1]} did not serve within {timeout:.0f} s; see {log.name}")


def stop_app(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def easy_vqa_requests(count: int) -> list[tuple[Path, str]]:
    """(image path, question) pairs spread over the easy-VQA test split."""
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    step = max(1, len(questions) // count)
    return [(Path(paths[image_ids[i]]), questions[i]) for i in range(0, step * count, step)]


def model_time(checkpoint, requests: list[tuple[Path, str]], repeats: int, threads: int) -> dict[str, float]:
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


def run_gradio_client(url: str, clients: int, next_request, *, duration: float, chain=("predict",),
                      server_pid: int | None = None) -> Run:
    """As queue_client.run, with one gradio_client.Client per thread (each call uploads its files)."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    # ssl_verify=False: plain http on localhost; with it on, httpx loads the CA bundle for each of the
    # client's requests, ~60 ms CPU each, which here would compete with the server for the same cores.
    sessions = [Client(url, verbose=False, ssl_verify=False) for _ in range(clients)]
    results: list[Result] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(n: int) -> None:
        barrier.wait()
        k = 0
        while time.monotonic() < stop_at:
            tag, values = next_request(n, k)
            k += 1
            start = time.perf_counter()
            try:
                for api_name in chain:
                    sessions[n].predict(*[handle_file(str(v)) if isinstance(v, Path) else v for v in values],
                                        api_name=f"/{api_name}")
                result = Result(tag, True, (time.perf_counter() - start) * 1000)
            except AppError as error:
                result = Result(tag, False, (time.perf_counter() - start) * 1000, str(error), refused=True)
            except Exception as error:  # reported, not raised: the benchmark counts them
                result = Result(tag, False, (time.perf_counter() - start) * 1000, f"{type(error).__name__}: {error}")
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    server = psutil.Process(server_pid) if server_pid else None
    server_before = cpu_seconds(server) if server else None
    cpu_before, began = time.process_time(), time.perf_counter()
    stop_at = time.monotonic() + duration
    barrier.wait()
    for thread in threads:
        thread.join()
    wall, client_cpu = time.perf_counter() - began, time.process_time() - cpu_before
    for session in sessions:
        session.close()
    return Run(results, wall, client_cpu, cpu_seconds(server) - server_before if server else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="checkpoint folder app.py serves")
    parser.add_argument("--duration", type=float, default=15.0,
                        help="seconds of load per measurement (2 apps x 2 chains x each level)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16], help="levels of concurrency")
    parser.add_argument("--client", choices=["async", "gradio_client"], default="async",
                        help="async: benchmarks/queue_client.py; gradio_client: one Client per thread")
    parser.add_argument("--no-explain", action="store_true", help="skip the /predict -> /explain measurements")
    parser.add_argument("--model-repeats", type=int, default=3, help="passes over 64 requests for the model timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for the model timing and the app")
    args = parser.parse_args()

    requests = easy_vqa_requests(64)
    model = model_time(args.checkpoint, requests, args.model_repeats, args.threads)
    print(f"model: forward p50 {model['forward_p50']:.1f} ms, p95 {model['forward_p95']:.1f} ms; "
          f"Predictor.answer (with image decoding) p50 {model['answer_p50']:.1f} ms, p95 {model['answer_p95']:.1f} ms")

    name = Path(args.checkpoint).name  # app.py names each model by its checkpoint folder

    def next_request(n: int, k: int) -> Request:
        image, question = requests[(n * 7 + k) % len(requests)]
        return "good", [name, image, question]

    def load(target, clients: int, chain, duration: float) -> dict:
        process, url = target
        if args.client == "async":
            result = run(url, clients, next_request, duration=duration, chain=chain, server_pid=process.pid)
        else:
            result = run_gradio_client(url, clients, next_request, duration=duration, chain=chain,
                                       server_pid=process.pid)
        return result.summary()

    chains = [("predict",)] + ([] if args.no_explain else [("predict", "explain")])
    apps = {"app.py": start_app(args.checkpoint, extra_args=["--threads", str(args.threads)]),
            "no-model floor": start_app(None, model=name)}
    results: dict[tuple, dict] = {}
    try:
        for target in apps.values():  # warm-up: every worker thread (and the explain path) has run
            load(target, max(args.clients), chains[-1], 2.0)
        for clients in args.clients:  # interleaved, so that both apps see the same machine
            for chain in chains:
                for label, target in apps.items():
                    results[label, clients, chain] = level = load(target, clients, chain, args.duration)
                    server = f", server {level['server_cpu_ms']:.1f}" if level["server_cpu_ms"] is not None else ""
                    print(f"{label}, {' -> '.join(chain)}, {clients:>2} clients: {level['requests']} requests, "
                          f"{level['failures']} failed, p50 {level['p50']:.1f} ms, p95 {level['p95']:.1f} ms, "
                          f"{level['per_second']:.1f} requests/s; CPU per request: client "
                          f"{level['client_cpu_ms']:.1f} ms{server}"
                          + (f" (first failure: {level['first_failure']})" if level["failures"] else ""),
                          flush=True)
    finally:
        for process, _ in apps.values():
            stop_app(process)

    print(f"goal model forward p50 <= 50 ms: {'met' if model['forward_p50'] <= 50 else 'MISSED'} "
          f"({model['forward_p50']:.1f} ms)")
    for chain in chains:
        for clients in args.clients:
            app, floor = results["app.py", clients, chain], results["no-model floor", clients, chain]
            ratio = app["p95"] / floor["p95"]
            verdict = f"goal <= {GOAL_RATIO}x: {'met' if ratio <= GOAL_RATIO else 'MISSED'}" if chain == ("predict",) \
                else "no goal"
            print(f"p95(app) / p95(floor), {' -> '.join(chain)}, {clients:>2} clients: {ratio:.2f}x "
                  f"({app['p95']:.1f} / {floor['p95']:.1f} ms; {verdict})")
    if len(args.clients) > 1:
        single, busiest = min(args.clients), max(args.clients)
        ratio = results["app.py", busiest, ("predict",)]["p95"] / results["app.py", single, ("predict",)]["p50"]
        print(f"app.py /predict: p95 at {busiest} clients / p50 at {single} client: {ratio:.2f}x")


if __name__ == "__main__":
    main()
