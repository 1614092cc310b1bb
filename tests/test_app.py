"""The Gradio app, served for real in a subprocess and driven through gradio_client and HTTP."""

import html
import re
import threading

import easy_vqa
import pytest
from fixtures import ROOT, SHIPPED_CHECKPOINT, draw_shape, http_get, png_claiming_size
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

QUESTION = "what color is the shape?"
ANSWERS = set(easy_vqa.get_answers())
MODEL = SHIPPED_CHECKPOINT.name  # the served model's name in the API


def ask(client, image, question, api_name="/predict"):
    return client.predict(MODEL, handle_file(image) if image else None, question, api_name=api_name)


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server["url"], verbose=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for color, shape in [("red", "circle"), ("blue", "rectangle"), ("yellow", "circle")]:
        paths[color] = folder / f"{color}.png"
        draw_shape(color, shape, seed=len(paths)).save(paths[color])
    paths["corrupt"] = folder / "corrupt.png"
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n but then not an image at all")
    paths["empty"] = folder / "empty.png"
    paths["empty"].write_bytes(b"")
    paths["huge"] = folder / "huge.png"
    paths["huge"].write_bytes(png_claiming_size(20000, 20000))
    return paths


def confidences(label: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label["confidences"]}


def test_predict_answers_easy_vqa_test_questions(client):
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    picks = range(0, len(questions), len(questions) // 12)[:12]
    correct = 0
    for i in picks:
        label, _, details = ask(client, paths[image_ids[i]], questions[i])
        assert details["answer"] == label["label"] and not details["unknown_words"]
        scores = confidences(label)
        assert len(scores) == 5 and label["label"] == next(iter(scores))
        assert list(scores.values()) == sorted(scores.values(), reverse=True)
        assert all(0 < p <= 1 for p in scores.values()) and sum(scores.values()) <= 1 + 1e-6
        correct += label["label"] == answers[i]
    assert correct >= 10, f"{correct} of 12 right"


def test_predict_on_a_drawn_shape(client, images):
    label, _, _ = ask(client, images["red"], QUESTION)
    assert label["label"] == "red"


def test_explain_returns_a_heatmap_image(client, images):
    path = ask(client, images["blue"], QUESTION, "/explain")
    with Image.open(path) as heatmap:
        assert heatmap.size == (256, 256) and heatmap.mode == "RGB"


def test_many_questions_give_one_row_each(client):
    """The questions easy-VQA asks about its first test image, one per line, blank lines skipped."""
    questions, answers, image_ids = easy_vqa.get_test_questions()
    asked = [(q, a) for q, a, image_id in zip(questions, answers, image_ids) if image_id == 0]
    text = "\n".join(q for q, _ in asked[:3]) + "\n\n  \n" + "\n".join(q for q, _ in asked[3:])
    table = ask(client, easy_vqa.get_test_image_paths()[0], text, "/predict_many")
    rows = table["data"]
    assert [row[0] for row in rows] == [q for q, _ in asked]
    assert all(row[1] in ANSWERS and re.fullmatch(r"\d{1,3}\.\d\d %", row[2]) for row in rows)
    correct = sum(row[1] == answer for row, (_, answer) in zip(rows, asked))
    assert correct >= len(asked) - 2, f"{correct} of {len(asked)} right"


@pytest.mark.parametrize("image, question, message", [
    (None, QUESTION, "no image"),
    ("red", "", "question is empty"),
    ("red", "   ", "question is empty"),
    ("red", "x" * 301, "301 characters long, over the limit of 300"),
    ("red", "what\x00color", "NUL byte"),
    ("red", "😀😀😀😀", "the question has no words (only symbols or emoji): ask in words"),
    ("red", "\u200b\u200b", "question is empty"),
    ("corrupt", QUESTION, "corrupt.png is not a readable image"),
    ("empty", QUESTION, "empty.png is empty (0 bytes)"),
    ("huge", QUESTION, "huge.png is over the limit of 40000000 pixels"),
])
def test_bad_input_gives_its_message_and_the_server_keeps_answering(client, server, images, image, question, message):
    with pytest.raises(AppError, match=re.escape(message)) as raised:
        ask(client, images[image] if image else None, question)
    assert str(server["log"].parent) not in str(raised.value) and "/gradio-cache" not in str(raised.value)
    label, _, _ = ask(client, images["red"], QUESTION)
    assert label["label"] in ANSWERS and len(label["confidences"]) == 5
    assert server["process"].poll() is None


def test_bad_input_to_many_questions_and_explain_gives_its_message(client, images):
    with pytest.raises(AppError, match="no questions"):
        ask(client, images["red"], "\n  \n", "/predict_many")
    with pytest.raises(AppError, match="not a readable image"):
        ask(client, images["corrupt"], QUESTION, "/explain")


def test_concurrent_users_with_some_mistakes_all_get_their_own_answer(server, images):
    """16 users at once; the ones with a mistake get an error, every other one its answer."""
    jobs = [("red", QUESTION, "red"), ("blue", QUESTION, "blue"), ("yellow", QUESTION, "yellow"),
            ("red", "", None), ("corrupt", QUESTION, None)] * 3 + [("blue", QUESTION, "blue")]
    results = [None] * len(jobs)

    def user(i, image, question):
        try:
            results[i] = ask(Client(server["url"], verbose=False), images[image], question)[0]["label"]
        except AppError as error:
            results[i] = error

    threads = [threading.Thread(target=user, args=(i, image, question)) for i, (image, question, _) in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for (image, question, expected), result in zip(jobs, results):
        if expected is None:
            assert isinstance(result, AppError), (image, question, result)
        else:
            assert result == expected, (image, question, result)


def test_one_session_flooding_the_queue_gets_its_share_and_the_others_are_answered(server, images):
    """20 heatmap requests joined at once from one session: those beyond its 8 waiting places are
    refused with a message (503, Gradio's queue-full answer); another user is answered meanwhile."""
    import httpx

    url = server["url"]
    with httpx.Client(timeout=60) as http:
        config = http.get(url + "config").json()
        prefix = url + config.get("api_prefix", "/gradio_api").strip("/") + "/"
        fn_index = {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}
        uploaded = http.post(prefix + "upload", files=[("files", ("red.png", open(images["red"], "rb").read()))])
        image = {"path": uploaded.json()[0], "orig_name": "red.png", "meta": {"_type": "gradio.FileData"}}
        joins = [http.post(prefix + "queue/join", json={
            "data": [MODEL, image, QUESTION], "event_data": None, "fn_index": fn_index["explain"],
            "trigger_id": None, "session_hash": "flooding-session"}) for _ in range(20)]
        refused = [j for j in joins if j.status_code == 503]
        assert refused and all(j.status_code in (200, 503) for j in joins)
        assert "Too many requests waiting from this session" in refused[0].json()["detail"]
        # 2 run (the heatmaps' concurrency) and at most 8 wait: at most 10 joined
        assert sum(j.status_code == 200 for j in joins) <= 10
        assert ask(Client(url, verbose=False), images["blue"], QUESTION)[0]["label"] == "blue"


@pytest.mark.parametrize("path", [
    "../../etc/passwd",
    "../../../../../../../../etc/passwd",
    "..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/etc/passwd",
    "//etc/passwd",
    "app.py",
    "./app.py",
    str(ROOT / "app.py"),
    str(ROOT / "vqa" / "predict.py"),
    str(SHIPPED_CHECKPOINT / "config.json"),
    str(SHIPPED_CHECKPOINT / "model.safetensors"),
    "checkpoints/easy-vqa/config.json",
    str(ROOT / ".git" / "config"),
])
def test_files_outside_the_app_are_refused(server, path):
    for route in ("gradio_api/file=", "file="):
        status, body = http_get(server["url"] + route + path)
        assert status in (403, 404), (route, path, status)
        for secret in (b"root:", b"def build_demo", b'"id2label"', b"[core]", b'"dtype"'):
            assert secret not in body, (route, path)


def test_the_api_is_served_only_through_the_queue(server, client, images):
    """The REST routes would answer outside the queue and its limits: they are closed."""
    import json
    import urllib.request

    for route in ("gradio_api/run/predict", "gradio_api/api/predict", "gradio_api/run/explain"):
        request = urllib.request.Request(server["url"] + route, data=json.dumps({"data": [MODEL, None, QUESTION]}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        assert status in (403, 404, 405) or b"queue" in body.lower(), (route, status, body[:200])
        assert b'"label"' not in body
    label, _, _ = ask(client, images["red"], QUESTION)  # the queue route still answers
    assert label["label"] == "red"


def test_refused_requests_log_one_line_not_a_traceback(server, client, images):
    with pytest.raises(AppError):
        ask(client, images["empty"], QUESTION)
    log = server["log"].read_text()
    assert "refused: " in log and "empty (0 bytes)" in log
    assert "Traceback" not in log


def test_a_noise_image_is_flagged_and_an_unknown_word_named(client, tmp_path):
    import numpy as np

    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise)
    label, notice, details = ask(client, noise, "how many cups are in the kitchen?")
    assert details["unusual_image"] is True and details["image_score"] > details["image_threshold"]
    assert "unlike anything this model was trained on" in notice
    assert {"cups", "kitchen"} <= set(details["unknown_words"]) and "in" not in details["unknown_words"]
    assert "Never seen in training:" in notice and "kitchen" in notice
    label, notice, details = ask(client, easy_vqa.get_test_image_paths()[0], "what color is the shape?")
    assert details["unusual_image"] is False and "unlike anything" not in notice


# The handlers, without a server.

@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    import app

    return app.load_models([tiny_checkpoint])


def test_importing_the_app_parses_no_arguments_and_loads_no_model():
    import subprocess
    import sys

    code = ("import sys; sys.argv = ['app.py', '--no-such-option']; import app; "
            "import vqa.model as m; print(len([o for o in __import__('gc').get_objects() "
            "if isinstance(o, m.VQAModel)]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "0"


def test_predict_handler_returns_answers_notice_and_details(models, tiny_checkpoint):
    import app

    name = tiny_checkpoint.name
    answers, notice, details = app.predict(models, name, draw_shape("red", "circle"), QUESTION)
    assert len(answers) == 5 and details["answer"] == next(iter(answers))
    assert details["confidence"] == pytest.approx(max(answers.values()))
    assert isinstance(notice, str)
    with pytest.raises(gr_error()) as raised:
        app.predict(models, "no-such-model", draw_shape("red", "circle"), QUESTION)
    assert "no model named" in str(raised.value)


def gr_error():
    import gradio as gr

    return gr.Error


def test_user_errors_escape_markup_of_the_file_name():
    import app
    from vqa.errors import InputError

    upload = {"path": "/tmp/gradio/abc/x.png", "orig_name": '<a href="http://x">log in</a><img src=x>.png'}
    error = app.user_error(InputError("/tmp/gradio/abc/x.png is not a readable image"), upload)
    text = str(error)
    assert "<a" not in text and "<img" not in text and "&lt;a href=" in text
    assert "/tmp/gradio" not in text


def test_markup_is_escaped_for_the_page_not_for_api_clients(monkeypatch):
    from gradio.context import LocalContext

    import app
    from vqa.errors import InputError

    class Request:  # what Gradio hands a handler: the headers of the queue/join request
        def __init__(self, user):
            self.headers = {"x-gradio-user": user}

    message = "row 1: shape '<b>x</b>' is not one of circle"
    escaped = "row 1: shape &#x27;&lt;b&gt;x&lt;/b&gt;&#x27; is not one of circle"
    for request, shown in ((None, escaped), (Request("app"), escaped), (Request("api"), message)):
        token = LocalContext.request.set(request)
        try:
            assert app.user_error(InputError(message)).message == shown
        finally:
            LocalContext.request.reset(token)


def test_scene_verdict_tells_an_ambiguous_question_from_an_unknown_one(models, tiny_checkpoint):
    import app

    rows = [["circle", "red", "small", "solid", 20, 20], ["circle", "grey", "small", "solid", 60, 30],
            ["square", "blue", "large", "solid", 30, 90]]
    name = tiny_checkpoint.name
    _, verdict, _ = app.ask_scene(models, name, rows, "What color is the circle?")  # two circles
    assert verdict == ("True answer: unknown: the question names an object that is not unique in this scene "
                       "(or a relation the margin leaves open).")
    _, verdict, _ = app.ask_scene(models, name, rows, "What is the meaning of life?")
    assert "matches none of the world's templates" in verdict
    _, verdict, _ = app.ask_scene(models, name, rows, "How many grey circles are there?")
    assert verdict.startswith("True answer: **1**.")
    for x, message in (("inf", "row 2: x is 'inf', not a finite number"), ("nan", "row 2: x is 'nan', not a finite")):
        with pytest.raises(gr_error(), match=re.escape(html.escape(message))):  # no request: for the page
            app.render_rows([rows[0], ["circle", "red", "small", "solid", x, 64]])


def test_notice_names_each_reason_not_to_trust_an_answer():
    import app
    from vqa.predict import Answer

    calm = Answer({"red": 0.99, "blue": 0.01}, 0.99, threshold=0.5, image_score=1.0, image_threshold=2.0)
    assert app.notice(calm) == ""
    worried = Answer({"red": 0.4, "blue": 0.3}, 0.4, threshold=0.5, image_score=3.0, image_threshold=2.0,
                     unknown_words=["cups", "<b>x</b>"])
    text = app.notice(worried)
    assert "unlike anything this model was trained on" in text and "Not sure" in text
    assert "cups, &lt;b&gt;x&lt;/b&gt;" in text


def test_many_questions_show_percentages_and_the_notices_of_ask(models, tiny_checkpoint, monkeypatch):
    import app
    from vqa.reliability.words import WordVocabulary

    predictor = models[tiny_checkpoint.name].predictor
    monkeypatch.setattr(predictor, "words", WordVocabulary.from_questions([QUESTION]))
    monkeypatch.setattr(predictor, "threshold", 0.99)  # an untrained model is never that sure
    image = draw_shape("red", "circle")
    rows = app.predict_many(models, tiny_checkpoint.name, image, f"{QUESTION}\n\n what colour is the zorblax?")
    assert [row[0] for row in rows] == [QUESTION, "what colour is the zorblax?"]
    single = predictor.assess(image, QUESTION, 1)
    assert rows[0][1:] == [next(iter(single.answers)), f"{100 * single.confidence:.2f} %",
                           "not sure (below the threshold of 99.00 %)"]
    assert rows[1][1] in ANSWERS and re.fullmatch(r"\d{1,3}\.\d\d %", rows[1][2])
    assert rows[1][3] == "never seen in training: colour, zorblax; not sure (below the threshold of 99.00 %)"


def test_many_questions_are_limited_to_50_per_request(models, tiny_checkpoint):
    import app

    assert app.MAX_QUESTIONS == 50
    image = draw_shape("blue", "rectangle")
    questions = [f"is there a {shape}?" for shape in ("circle", "rectangle", "triangle")] * 17  # 51 lines
    with pytest.raises(gr_error()) as raised:
        app.predict_many(models, tiny_checkpoint.name, image, "\n".join(questions))
    assert "51 questions, over the limit of 50 per request" in str(raised.value)
    rows = app.predict_many(models, tiny_checkpoint.name, image, "\n".join(questions[:50]))
    assert [row[0] for row in rows] == questions[:50] and all(row[1] in ANSWERS for row in rows)


def test_compare_answers_with_every_model(models, tiny_checkpoint):
    import app

    rows = app.compare(models, draw_shape("blue", "circle"), QUESTION)
    assert [row[0] for row in rows] == [tiny_checkpoint.name]
    assert rows[0][1] in ANSWERS and 0 < rows[0][2] <= 1


def test_model_markdown_says_what_the_checkpoint_is(models, tiny_checkpoint):
    import app

    text = app.model_markdown(models[tiny_checkpoint.name].predictor.describe())
    assert "test_resnet CNN + 2-layer LSTM (24 units)" in text and "easy-vqa" in text
    assert "13" in text


def test_attention_maps_over_the_api(server, client, tmp_path):
    from vqa.worlds.shapes import random_scene, render_scene

    scene = tmp_path / "scene.png"
    render_scene(random_scene(5)).save(scene)
    glimpses = client.predict("shapes-world-attention", handle_file(scene), "how many circles are there?",
                              api_name="/attention")
    # The shipped attention model: 2 hops of 2 glimpses, in order.
    assert [item["caption"] for item in glimpses] == ["hop 1, glimpse 1", "hop 1, glimpse 2",
                                                      "hop 2, glimpse 1", "hop 2, glimpse 2"]
    for item in glimpses:
        with Image.open(item["image"]) as overlay:
            assert overlay.size == (256, 256)  # a 128 px scene, shown at the overlay's minimum side
    pooled = client.predict("shapes-world", handle_file(scene), "how many circles are there?", api_name="/attention")
    assert pooled == []


def test_compare_and_scene_endpoints(server, client):
    rows, image, suggestions = client.predict(3, api_name="/new_scene")
    table = rows["data"]
    assert 3 <= len(table) <= 10 and all(len(row) == 6 for row in table)
    question, truth = suggestions["data"][0]
    label, verdict, _ = client.predict("shapes-world", rows, question, api_name="/ask_scene")
    assert f"True answer: **{truth}**" in verdict
    assert ("right" in verdict) == (label["label"] == truth)
    compared = client.predict(handle_file(image), question, api_name="/compare")["data"]
    assert [row[0] for row in compared] == ["easy-vqa", "shapes-world", "shapes-world-attention"]


def test_api_clients_get_messages_without_html_escapes(client):
    rows = {"headers": ["shape", "color", "size", "material", "x", "y"],
            "data": [["<b>", "red", "small", "solid", 20, 20]], "metadata": None}
    with pytest.raises(AppError, match=re.escape("row 1: shape '<b>' is not one of circle")):
        client.predict(rows, api_name="/render_scene")


def test_answers_never_share_a_concurrency_group_with_heatmaps(models):
    import app

    groups = {}
    for fn in app.build_demo(models).fns.values():
        groups.setdefault(fn.concurrency_id, set()).add(fn.api_name or fn.name)
    heavy = {group for group, names in groups.items() if "explain" in names}
    assert len(heavy) == 1
    answering = {"predict", "compare", "attention", "predict_many", "ask_scene"}
    assert not answering & groups[heavy.pop()], groups


def test_uploads_are_deleted_from_the_cache_after_an_hour(models):
    import app

    demo = app.build_demo(models)
    assert demo.delete_cache == (600, app.UPLOAD_LIFETIME_S) and app.UPLOAD_LIFETIME_S == 3600
    readme = (ROOT / "README.md").read_text()
    assert "Uploads are kept in Gradio's cache for an hour, then deleted" in readme
