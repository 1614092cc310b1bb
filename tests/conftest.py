"""pytest fixtures: a tiny checkpoint (pooled and attention), small VQA v2-layout files, the app server.

Helpers (draw_shape, tiny_config, ...) live in fixtures.py; import them from there.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import *  # noqa: F401,F403  -- re-exported for test files that still import helpers from conftest
from fixtures import ROOT, SHIPPED_CHECKPOINT, free_port, http_get, make_vqa_v2_files, save_tiny_checkpoint

from vqa.text import QuestionTokenizer

# One intra-op thread for the tests run in this process (subprocesses keep their own default). The
# tests' tensors are tiny and the machine has 2 cores, often shared: measured on 151 tests of
# test_model/scene_encoder/evaluate/explain/predict beside a training job, 95-100 s with one thread
# against 215 s with two (thread hand-offs and spinning cost more than the second core gives).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def easy_vqa_answers() -> list[str]:
    import easy_vqa

    return sorted(easy_vqa.get_answers())


@pytest.fixture(scope="session")
def easy_vqa_tokenizer() -> QuestionTokenizer:
    import easy_vqa

    return QuestionTokenizer.train(easy_vqa.get_train_questions()[0], vocab_size=400)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, easy_vqa_answers, easy_vqa_tokenizer) -> Path:
    """An untrained tiny pooled model (the paper's, attention_glimpses=0) over the easy-VQA answers,
    saved as a real checkpoint. Treat it as read-only: copy it to change it."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", easy_vqa_answers, easy_vqa_tokenizer)


@pytest.fixture(scope="session")
def attention_checkpoint(tmp_path_factory, easy_vqa_answers, easy_vqa_tokenizer) -> Path:
    """As tiny_checkpoint, with 2 glimpses of attention over test_resnet's 8 x 8 map (output_stride 8)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "attention", easy_vqa_answers,
                                easy_vqa_tokenizer, attention_glimpses=2, output_stride=8)


@pytest.fixture
def vqa_v2_files(tmp_path) -> dict:
    return make_vqa_v2_files(tmp_path)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """app.py on the shipped checkpoints, in a subprocess on a free port (shared by the app and browser tests)."""
    if not (SHIPPED_CHECKPOINT / "model.safetensors").is_file():
        pytest.skip(f"the shipped checkpoint {SHIPPED_CHECKPOINT} is not there (train it with training/train.py)")
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio-cache"))}
    log = tmp_path_factory.mktemp("app") / "app.log"
    with log.open("w") as out:
        # easy-VQA first (the default of the Ask tab, which the easy-VQA tests use), then the shapes-world models.
        served = [SHIPPED_CHECKPOINT, *(p for p in sorted(SHIPPED_CHECKPOINT.parent.iterdir())
                                        if p.name.startswith("shapes-world") and (p / "model.safetensors").is_file())]
        process = subprocess.Popen([sys.executable, "app.py", "--port", str(port),
                                    *(arg for folder in served for arg in ("--checkpoint", str(folder)))],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()}")
        try:
            if http_get(url)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"app.py did not serve within 180 s:\n{log.read_text()}")
    yield {"url": url, "process": process, "log": log}
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
