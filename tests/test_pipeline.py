"""vqa/pipeline.py and training/vqa_v2.py: the whole VQA v2 pipeline, from a local HTTP server that
serves tiny archives under the official paths to the test-dev results file, with timm's test_resnet.

The server (stdlib http.server, in a thread) serves a folder laid out like the official hosts
and records every request, so that a second run can be shown to fetch nothing.
"""

import functools
import importlib.util
import json
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fixtures import ROOT, make_vqa_v2_files

import vqa.trainer
from vqa.checkpoint import read_card
from vqa.download import SPLITS, archives_for
from vqa.errors import DataError
from vqa.pipeline import results_file_name

_spec = importlib.util.spec_from_file_location("vqa_v2", ROOT / "training" / "vqa_v2.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--embed-dim", "8", "--lstm-hidden", "8",
        "--common-dim", "16", "--classifier-hidden", "16", "--dropout", "0", "--epochs", "1", "--batch-size", "4",
        "--val-fraction", "0.2", "--logging-steps", "1", "--no-progress"]
TEST_DEV_IMAGES = 3  # test-dev asks about the first 3 of test2015's 4 images
RESULTS = results_file_name("lstm-cnn")


def _zip(path: Path, members: dict[str, Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, source in members.items():
            archive.write(source, name)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The official archives, tiny, under their URL paths: 12 train2014 images (24 questions), 4 val2014,
    4 test2015 of which test-dev asks about 3; COCO-named images, 10 human answers per question."""
    made = tmp_path_factory.mktemp("made")
    train = make_vqa_v2_files(made / "train", n_images=12, subtype="train2014", seed=1)
    val = make_vqa_v2_files(made / "val", n_images=4, subtype="val2014", seed=2)
    test = make_vqa_v2_files(made / "test", n_images=4, subtype="test2015", seed=3, with_annotations=False)
    questions = json.loads(test["questions"].read_text())
    test_dev_ids = sorted({q["image_id"] for q in questions["questions"]})[:TEST_DEV_IMAGES]
    questions["questions"] = [q for q in questions["questions"] if q["image_id"] in test_dev_ids]
    test_dev = made / "test" / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    test_dev.write_text(json.dumps({**questions, "data_subtype": "test-dev2015"}))

    files = {}
    for data in (train, val, test):
        files.update({data["questions"].name: data["questions"]})
        if data["annotations"] is not None:
            files[data["annotations"].name] = data["annotations"]
        images = Path(data["images"])
        files[images.name + "/"] = {f"{images.name}/{p.name}": p for p in sorted(images.iterdir())}
    files[test_dev.name] = test_dev

    site = tmp_path_factory.mktemp("site")
    for archive in archives_for(SPLITS):
        members = {}
        for output in archive.outputs:
            members.update(files[output] if output.endswith("/") else {output: files[output]})
        _zip(site / archive.url.split("://", 1)[1].split("/", 1)[1], members)
    return site


class Server:
    """A static server of `folder` that records the path of every request."""

    def __init__(self, folder: Path):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                requests.append(self.path)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def server(site):
    served = Server(site)
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


def pipeline(tmp_path: Path, server: Server, *extra) -> int:
    return cli.main(["--root", str(tmp_path / "data"), "--out", str(tmp_path / "vqa-v2"), "--mirror", server.url,
                     *TINY, *extra])


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def step_lines(output: str, word: str) -> list[str]:
    """The step after which each `word` line ("done in", "skipped:") was printed."""
    found, step = [], None
    for line in output.splitlines():
        if line.startswith("step "):
            step = line.split(":")[0]
        elif line.strip().startswith(word):
            found.append(step)
    return found


STEPS = ["step 1/5 download", "step 2/5 features", "step 3/5 train", "step 4/5 evaluate-val",
         "step 5/5 results-test-dev"]


def test_one_command_from_the_server_to_the_results_file_and_a_second_run_does_nothing(tmp_path, server, capsys):
    assert pipeline(tmp_path, server) == 0
    out = capsys.readouterr().out
    assert step_lines(out, "done in") == STEPS, out

    data, checkpoint = tmp_path / "data", tmp_path / "vqa-v2"
    assert (data / "train2014").is_dir() and (data / "v2_mscoco_val2014_annotations.json").is_file()
    for split, images in (("train", 12), ("val", 4), ("test-dev", TEST_DEV_IMAGES)):  # train: the held out too
        assert len(json.loads((tmp_path / "vqa-v2.features" / split / "index.json").read_text())) == images
    card = read_card(checkpoint)
    assert card["train_questions"] == 20 and card["val_questions"] == 4
    assert "training/vqa_v2.py --root" in card["command"]
    metrics = json.loads((checkpoint / "eval-val" / "metrics.json").read_text())
    assert len(metrics["perQuestion"]) == 8 and 0 <= metrics["overall"] <= 100

    test = json.loads((data / "v2_OpenEnded_mscoco_test2015_questions.json").read_text())["questions"]
    test_dev = {q["question_id"] for q in
                json.loads((data / "v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text())["questions"]}
    upload = json.loads((checkpoint / "results-test-dev" / RESULTS).read_text())
    # Every test2015 question, as the server asks; the test-dev ones answered from the model's answers.
    assert [r["question_id"] for r in upload] == [q["question_id"] for q in test]
    answers = set(json.loads((checkpoint / "config.json").read_text())["id2label"].values())
    assert all((r["answer"] in answers) == (r["question_id"] in test_dev) for r in upload)
    assert all(r["answer"] == "" for r in upload if r["question_id"] not in test_dev)

    before, server.requests[:] = files_under(tmp_path), []
    assert pipeline(tmp_path, server) == 0
    again = capsys.readouterr().out
    assert step_lines(again, "skipped:") == STEPS and "done in" not in again, again
    assert server.requests == []
    assert files_under(tmp_path) == before


def test_a_crash_in_training_and_the_same_command_continues_from_there(tmp_path, server, monkeypatch, capsys):
    fit_reliability = vqa.trainer.fit_reliability
    crashes = []

    def crash_once(*args, **kwargs):  # after the last epoch, before the checkpoint is written
        if not crashes:
            crashes.append(1)
            raise DataError("the machine went away")
        return fit_reliability(*args, **kwargs)

    monkeypatch.setattr(vqa.trainer, "fit_reliability", crash_once)
    assert pipeline(tmp_path, server) == 2
    first = capsys.readouterr()
    assert "error: the machine went away" in first.err
    assert step_lines(first.out, "done in") == STEPS[:2] and step_lines(first.out, "failed after") == STEPS[2:3]
    assert not (tmp_path / "vqa-v2").exists() and any((tmp_path / "vqa-v2.trainer").glob("checkpoint-*"))

    caches, server.requests[:] = files_under(tmp_path / "vqa-v2.features"), []
    assert pipeline(tmp_path, server) == 0
    second = capsys.readouterr().out
    assert step_lines(second, "skipped:") == STEPS[:2] and step_lines(second, "done in") == STEPS[2:], second
    assert "continuing from the last checkpoint" in second
    assert server.requests == [] and files_under(tmp_path / "vqa-v2.features") == caches
    assert (tmp_path / "vqa-v2" / "results-test-dev" / RESULTS).is_file()


def test_a_bad_setting_stops_before_any_download(tmp_path, server, capsys):
    assert pipeline(tmp_path, server, "--epochs", "0") == 2
    assert "error: --epochs must be more than 0" in capsys.readouterr().err
    assert server.requests == [] and not (tmp_path / "data").exists()


def test_help_names_the_pipeline_options(capsys):
    # that every option has words after it is tests/test_training.py::test_every_option_has_help
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    for flag in ("--root", "--out", "--mirror", "--no_progress", "--epochs", "--batch_size", "--backbone",
                 "--pretrained", "--image_size", "--fine_tune_backbone", "--algorithm"):
        assert f"\n  {flag} " in options or f"\n  {flag}\n" in options, flag