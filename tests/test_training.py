"""training/train.py end to end on tiny models and small VQA v2-layout data."""

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import ROOT, make_vqa_v2_files

from vqa.checkpoint import load_checkpoint, read_card
from vqa.trainer import last_complete_checkpoint

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--crop-pct", "1.0", "--embed-dim", "16",
        "--lstm-hidden", "24", "--common-dim", "32", "--classifier-hidden", "32", "--dropout", "0.1",
        "--batch-size", "8", "--learning-rate", "5e-3", "--logging-steps", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    train = make_vqa_v2_files(folder / "train", n_images=30, subtype="train2014", seed=1)
    test = make_vqa_v2_files(folder / "test", n_images=6, subtype="val2014", seed=2)
    return ["--dataset", "files", "--train-questions", str(train["questions"]),
            "--train-annotations", str(train["annotations"]), "--train-images", str(train["images"]),
            "--test-questions", str(test["questions"]), "--test-annotations", str(test["annotations"]),
            "--test-images", str(test["images"]), "--val-fraction", "0.2"]


def train_command(out: Path, *args) -> list[str]:
    return [sys.executable, str(ROOT / "training" / "train.py"), "--output-dir", str(out), *TINY, *args]


def run_train(out: Path, *args, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(out, *args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_here(capsys, out: Path, *args) -> tuple[int, str]:
    """training/train.py's main() in this process, with run_train's options: (exit status, its stderr).
    Only the end-to-end run (`trained`) and the signal tests pay for a fresh interpreter each."""
    capsys.readouterr()
    code = _train_script().main(["--output-dir", str(out), *TINY, *map(str, args)])
    return code, capsys.readouterr().err


def losses(out: Path) -> list[float]:
    state = json.loads((last_complete_checkpoint(Path(f"{out}.trainer")) / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("runs") / "model"
    run_train(out, *data, "--epochs", "6")
    return out


def test_training_writes_a_complete_checkpoint_and_the_loss_falls(trained):
    history = losses(trained)
    assert len(history) >= 20
    assert sum(history[-4:]) / 4 < 0.7 * sum(history[:4]) / 4
    model, tokenizer = load_checkpoint(trained)
    assert set(model.config.answers) >= {"yes", "red", "green", "blue", "yellow"}
    card = read_card(trained)
    assert card["train_questions"] + card["val_questions"] == 60
    assert card["test_questions"] == 12 and 0 <= card["test_accuracy"] <= 100
    assert card["seed"] == 0 and "training/train.py" in card["command"]
    assert (trained / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(Path(f"{trained}.trainer").glob("runs/*/events.out.tfevents.*"))  # TensorBoard logs


def test_fine_tuning_keeps_tokenizer_and_extends_answers(tmp_path, trained, capsys):
    new = make_vqa_v2_files(tmp_path / "new", n_images=10, subtype="train2014", seed=5)
    annotations = json.loads(new["annotations"].read_text())
    for a in annotations["annotations"]:
        if a["answer_type"] == "other":
            a["answers"] = [{"answer": "purple", "answer_confidence": "yes", "answer_id": i} for i in range(10)]
    new["annotations"].write_text(json.dumps(annotations))
    old_model, old_tokenizer = load_checkpoint(trained)
    out = tmp_path / "tuned"
    code, stderr = train_here(capsys, out, "--init-from", trained, "--dataset", "files", "--train-questions",
                              new["questions"], "--train-annotations", new["annotations"], "--train-images",
                              new["images"], "--epochs", "1", "--learning-rate", "0")
    assert code == 0, stderr[-3000:]
    # The card's command is the one main() was given (not the test runner's sys.argv).
    assert shlex.split(read_card(out)["command"]) == [
        "python", "training/train.py", "--output-dir", str(out), *TINY, "--init-from", str(trained), "--dataset",
        "files", "--train-questions", str(new["questions"]), "--train-annotations", str(new["annotations"]),
        "--train-images", str(new["images"]), "--epochs", "1", "--learning-rate", "0"]
    model, tokenizer = load_checkpoint(out)
    old_answers = old_model.config.answers
    assert model.config.answers[: len(old_answers)] == old_answers
    assert model.config.answers[len(old_answers):] == ["purple"]
    assert tokenizer.model_proto == old_tokenizer.model_proto
    # learning rate 0: the old answers' classifier rows are exactly the old ones
    assert torch.equal(model.classifier[-1].weight[: len(old_answers)], old_model.classifier[-1].weight)


def wait_for(predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def test_sigkill_at_any_point_then_resume_reaches_the_same_accuracy(tmp_path, data, trained):
    out = tmp_path / "killed"
    work = Path(f"{out}.trainer")
    # Kill twice: once right after the first checkpoint appears (possibly mid-save),
    # once while the second epoch is training.
    for target in (1, 2):
        process = subprocess.Popen(train_command(out, *data, "--epochs", "6", "--resume"), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: len(list(work.glob("checkpoint-*"))) >= target)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        checkpoint = last_complete_checkpoint(work)
        if checkpoint is not None:
            from vqa.model import VQAModel

            VQAModel.from_pretrained(checkpoint)  # the last complete checkpoint loads
    assert not out.exists()  # nothing final was written by the killed runs
    saved = last_complete_checkpoint(work)
    assert saved is not None  # the second kill came after at least one complete save
    saved_step = json.loads((saved / "trainer_state.json").read_text())["global_step"]
    before = set(work.glob("runs/*/events.out.tfevents.*"))
    timed_before = json.loads((work / "run.json").read_text())["training_time_s"]
    assert timed_before > 0  # the killed runs' training time was kept at their saves
    run_train(out, *data, "--epochs", "6", "--resume")
    # The resumed run logged (to TensorBoard files of its own) only steps after the saved one.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for path in set(work.glob("runs/*/events.out.tfevents.*")) - before:
        events = EventAccumulator(str(path))
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            steps += [e.step for e in events.Scalars("train/loss")]
    assert steps and min(steps) > saved_step
    resumed, uninterrupted = read_card(out), read_card(trained)
    # The card tells the whole run's time and the command that reproduces it (not the --resume).
    # (run.json keeps the unrounded seconds: the whole tiny run can take under 1.5 s)
    assert json.loads((work / "run.json").read_text())["training_time_s"] > timed_before
    assert resumed["training_time_s"] >= round(timed_before)
    assert "--resume" not in resumed["command"] and "--epochs 6" in resumed["command"]
    assert abs(resumed["val_accuracy"] - uninterrupted["val_accuracy"]) <= 0.3
    assert abs(resumed["test_accuracy"] - uninterrupted["test_accuracy"]) <= 0.3


def test_incomplete_checkpoint_is_never_resumed_from(tmp_path):
    work = tmp_path / "run.trainer"
    for step, complete in [(10, True), (20, True), (30, False)]:
        folder = work / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (work / "checkpoint-20" / "trainer_state.json").write_text('{"global_st')  # cut short mid-write
    assert last_complete_checkpoint(work) == work / "checkpoint-10"
    assert not (work / "checkpoint-30").exists() and not (work / "checkpoint-20").exists()


def test_sigterm_saves_and_stops_cleanly(tmp_path, data):
    out = tmp_path / "stopped"
    work = Path(f"{out}.trainer")
    process = subprocess.Popen(train_command(out, *data, "--epochs", "200"), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Training has begun (its TensorBoard file exists), so the signal handler is installed.
    wait_for(lambda: list(work.glob("runs/*/events.out.tfevents.*")))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "SIGTERM received" in stderr and "--resume" in stderr
    checkpoint = last_complete_checkpoint(work)
    assert checkpoint is not None
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] < state["max_steps"]
    # The checkpoint holds the step training stopped at: the last step logged to TensorBoard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = []
    for path in work.glob("runs/*/events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        logged += [e.step for e in events.Scalars("train/loss")] if "train/loss" in events.Tags()["scalars"] else []
    assert logged and state["global_step"] == max(logged)


def test_a_signal_during_training_asks_for_a_save_at_that_step_and_a_stop():
    """StopOnSignal's own promise, whatever the save strategy: the step the signal arrives in ends
    with a save and a stop (with save_strategy "epoch" the Trainer also saves when the stopped epoch ends)."""
    from transformers import TrainerControl

    from vqa.trainer import StopOnSignal

    handlers = {sig: signal.getsignal(sig) for sig in StopOnSignal.SIGNALS}
    try:
        stop = StopOnSignal()
        control = stop.on_step_end(None, None, TrainerControl())
        assert not control.should_save and not control.should_training_stop  # no signal: train on
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == "SIGTERM"
        control = stop.on_step_end(None, None, TrainerControl())
        assert control.should_save and control.should_training_stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("signals", [1, 2])
def test_a_signal_after_training_lets_the_final_save_finish_a_second_stops_it(tmp_path, data, monkeypatch, capsys,
                                                                              signals):
    """Training is over when the reliability files are fitted: one SIGTERM there says at once that
    the final save is finishing and lets it finish; a second stops at once, and the Trainer's last
    checkpoint, of the last step, stays for --resume. In-process: the signals arrive at a known point."""
    import vqa.trainer

    fit_reliability, notices = vqa.trainer.fit_reliability, []

    def signalled(*args, **kwargs):
        for _ in range(signals):
            signal.raise_signal(signal.SIGTERM)
        notices.append(capsys.readouterr().err)
        return fit_reliability(*args, **kwargs)

    monkeypatch.setattr(vqa.trainer, "fit_reliability", signalled)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "model"
    args = ["--output-dir", str(out), *TINY, *data, "--epochs", "1"]
    code = _train_script().main(args)
    if signals == 1:
        assert code == 0 and "SIGTERM received after training: finishing the final save" in notices[0]
        assert "answer_threshold" in read_card(out)
    else:
        assert code == 130 and not notices and not out.exists()
        assert "--resume" in capsys.readouterr().err
        state = json.loads((last_complete_checkpoint(Path(f"{out}.trainer")) / "trainer_state.json").read_text())
        assert state["global_step"] == state["max_steps"]
        monkeypatch.setattr(vqa.trainer, "fit_reliability", fit_reliability)
        assert _train_script().main([*args, "--resume"]) == 0  # trains no step, measures and saves
        assert "answer_threshold" in read_card(out)
    assert signal.getsignal(signal.SIGTERM) is handler  # training's handlers are gone with it


def test_bad_dataset_arguments_exit_2_with_a_message(tmp_path, capsys):
    code, stderr = train_here(capsys, tmp_path / "x", "--dataset", "files")
    assert code == 2
    assert "error: --dataset files needs --train-questions" in stderr


def test_unreadable_training_image_fails_by_name_or_is_skipped_on_request(tmp_path, capsys):
    files = make_vqa_v2_files(tmp_path / "data", n_images=12, subtype="train2014", seed=3)
    broken = sorted(files["images"].iterdir())[0]
    broken.write_bytes(b"\xff\xd8 not really a JPEG")
    data = ["--dataset", "files", "--train-questions", str(files["questions"]),
            "--train-annotations", str(files["annotations"]), "--train-images", str(files["images"]),
            "--epochs", "1", "--val-fraction", "0.25"]
    code, stderr = train_here(capsys, tmp_path / "strict", *data)
    assert code == 2 and broken.name in stderr and "--skip-bad-images" in stderr
    # Found before the first step: no training had started.
    assert not list((tmp_path / "strict.trainer").glob("runs/*/events.out.tfevents.*"))
    code, stderr = train_here(capsys, tmp_path / "lenient", *data, "--skip-bad-images")
    assert code == 0, stderr[-3000:]
    assert "skipped 1 unreadable images" in stderr and broken.name in stderr
    card = read_card(tmp_path / "lenient")
    assert card["skipped_images"] == 1 and card["train_questions"] + card["val_questions"] == 22


def test_an_image_id_naming_two_files_in_train_and_validation_is_refused_before_training(tmp_path, capsys,
                                                                                          monkeypatch):
    """A dataset with its own validation split (as shapes-world has) whose validation images reuse a
    training image id for another file: an error naming both files, before any step."""
    import vqa.trainer
    from vqa.records import load_vqa_split

    train = make_vqa_v2_files(tmp_path / "train", n_images=12, subtype="train2014", seed=3)
    val = make_vqa_v2_files(tmp_path / "val", n_images=3, subtype="val2014", seed=4)  # ids 1000, 1007, 1014 again
    monkeypatch.setattr(vqa.trainer, "load_training_data", lambda options: (
        load_vqa_split(train["questions"], train["annotations"], train["images"]),
        load_vqa_split(val["questions"], val["annotations"], val["images"]), None))
    code, stderr = train_here(capsys, tmp_path / "x", "--dataset", "files", "--train-questions", train["questions"],
                              "--train-annotations", train["annotations"], "--train-images", train["images"],
                              "--epochs", "1")
    assert code == 2, stderr[-3000:]
    train_file = train["images"] / "COCO_train2014_000000001000.jpg"
    val_file = val["images"] / "COCO_val2014_000000001000.jpg"
    assert f"image id 1000 names two files, {train_file} (train) and {val_file} (validation)" in stderr
    assert not list((tmp_path / "x.trainer").glob("runs/*/events.out.tfevents.*"))  # no training had started


@pytest.mark.parametrize("args, message", [
    (["--tokenizer-vocab", "10"], "vocabulary size 10 is too small"),
    (["--epochs", "1", "--max-train-questions", "4"], "4 training questions, fewer than one batch of 8"),
])
def test_impossible_settings_are_a_message_not_a_traceback(tmp_path, data, capsys, args, message):
    # In-process an exception that escaped main() (a traceback at the command line) fails the test here.
    code, stderr = train_here(capsys, tmp_path / "x", *data, *args)
    assert code == 2 and "Traceback" not in stderr
    assert stderr.startswith("error: ") or "\nerror: " in stderr
    assert message in stderr


def test_nonstandard_answer_counts_are_refused_unless_allowed(tmp_path, capsys):
    files = make_vqa_v2_files(tmp_path / "data", n_images=10, subtype="train2014", seed=4)
    annotations = json.loads(files["annotations"].read_text())
    for a in annotations["annotations"]:
        a["answers"] = a["answers"][:1]  # one answer per question, as some datasets give
    files["annotations"].write_text(json.dumps(annotations))
    data = ["--dataset", "files", "--train-questions", str(files["questions"]),
            "--train-annotations", str(files["annotations"]), "--train-images", str(files["images"]),
            "--epochs", "1", "--val-fraction", "0.2"]
    code, stderr = train_here(capsys, tmp_path / "strict", *data)
    assert code == 2
    assert "20 questions do not have 10 human answers (20 with 1)" in stderr
    assert "--allow-nonstandard-answers" in stderr
    # A warning (on stderr at the command line): in-process pytest records it instead.
    with pytest.warns(UserWarning, match="used as they are"):
        code, stderr = train_here(capsys, tmp_path / "lenient", *data, "--allow-nonstandard-answers")
    assert code == 0, stderr[-3000:]


@pytest.mark.parametrize("script", ["training/train.py", "training/train_encoder.py", "training/evaluate.py",
                                    "training/extract_features.py", "training/vqa_v2.py",
                                    "training/download_vqa_v2.py", "app.py"])
def test_every_option_has_help(script, capsys):
    """`--help` describes every option: no option line without words after it. In-process: argparse
    prints the help and raises SystemExit(0), as the script does at the command line."""
    if script == "app.py":
        import app as module  # as test_app.py does: importing it parses no arguments and loads no model
    else:
        module = _load_script(ROOT / script)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    options = out.split("options:", 1)[1]
    entries, current = [], None
    for line in options.splitlines():
        stripped = line.strip()
        if stripped.startswith("-"):
            current = [stripped]
            entries.append(current)
        elif current is not None and stripped:
            current.append(stripped)
    assert len(entries) >= 4
    for entry in entries:
        flag, _, rest = entry[0].partition("  ")
        described = rest.strip() or len(entry) > 1
        assert described, f"{script}: {flag} has no help text"


def test_scripts_run_nowhere_else_as_a_command_start_as_one():
    """train.py, evaluate.py, extract_features.py, download_vqa_v2.py and app.py run as commands in
    other tests; these two only in-process. One interpreter runs each as `python training/X.py --help`
    does: as __main__, with training/ first on sys.path."""
    code = ("import runpy, sys\n"
            "for script in sys.argv[1:]:\n"
            "    sys.argv, sys.path[0] = [script, '--help'], str(__import__('pathlib').Path(script).parent)\n"
            "    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit as stop:\n"
            "        assert stop.code == 0, (script, stop.code)\n"
            "    else:\n"
            "        raise AssertionError(script + ' --help did not exit')\n")
    scripts = [str(ROOT / "training" / name) for name in ("train_encoder.py", "vqa_v2.py")]
    result = subprocess.run([sys.executable, "-c", code, *scripts], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("options:") == 2


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_script():
    return _load_script(ROOT / "training" / "train.py")


@pytest.mark.parametrize("args, message", [
    (["--attention-glimpses", "-1"], "--attention-glimpses must be at least 0 and at most 16, not -1"),
    (["--attention-hops", "0"], "--attention-hops must be at least 1 and at most 8, not 0"),
    (["--output-stride", "7"], "--output-stride must be one of 8, 16, 32, not 7"),
    (["--batch-size", "0"], "--batch-size must be at least 1 and at most 1000000, not 0"),
    (["--lstm-layers", "0"], "--lstm-layers must be at least 1 and at most 8, not 0"),
    (["--dropout", "2"], "--dropout must be at least 0.0 and at most 0.95, not 2.0"),
    (["--learning-rate", "nan"], "--learning-rate must be at least 0 and at most 10, not nan"),
    (["--epochs", "0"], "--epochs must be more than 0 and at most 100000, not 0.0"),
    (["--epochs", "-1"], "--epochs must be more than 0 and at most 100000, not -1.0"),
    (["--val-fraction", "1.5"], "--val-fraction must be more than 0 and at most 0.9, not 1.5"),
    (["--top-answers", "0"], "--top-answers must be at least 1 and at most 100000, not 0"),
    (["--image-size", "100000"], "--image-size must be at least 16 and at most 2048, not 100000"),
    (["--side-loss-weight", "-1"], "--side-loss-weight must be at least 0.0 and at most 100.0, not -1.0"),
    (["--train-scenes", "0"], "--train-scenes must be at least 1 and at most 10000000, not 0"),
    (["--train-scenes", "100"], "--train-scenes sets the size of the built-in shapes world: "
                                "it needs --dataset shapes-world"),
])
def test_settings_are_checked_before_any_data_is_read(tmp_path, capsys, args, message):
    # The data files do not exist: a check made after reading them would complain about them instead.
    missing = str(tmp_path / "missing.json")
    code = _train_script().main(["--output-dir", str(tmp_path / "x"), "--dataset", "files", "--train-questions",
                                 missing, "--train-annotations", missing, "--train-images", str(tmp_path), *args])
    error = capsys.readouterr().err
    assert code == 2 and error == f"error: {message}\n"
    assert not (tmp_path / "x.trainer").exists()


def test_a_checkpoint_config_out_of_range_names_the_file_and_field(tmp_path, tiny_checkpoint):
    import shutil

    from vqa.errors import OptionError

    folder = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["image_size"] = -5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(OptionError, match=r"bad/config.json: image_size must be at least 16 and at most 2048, not -5"):
        load_checkpoint(folder)


def test_train_scenes_sizes_the_shapes_world_training_split_only(tmp_path, monkeypatch):
    from vqa.errors import DataError
    from vqa.worlds.registry import load_builtin, load_shapes_world

    monkeypatch.setenv("VQA_CACHE_DIR", str(tmp_path))
    larger = load_builtin("shapes-world", "train", scenes=7)
    assert len(larger.image_paths) == 7 and len(larger.records) == 70
    # the same scenes as the world's own generator makes for that size, cached under their own key
    again = load_shapes_world("train", cache_dir=tmp_path / "shapes-world", progress=False, train_scenes=7)
    assert [r["question"] for r in again.records] == [r["question"] for r in larger.records]
    with pytest.raises(DataError, match="easy-vqa has a fixed size"):
        load_builtin("easy-vqa", "train", scenes=7)
