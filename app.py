"""The Gradio demo: ask a question about an image, see the top answers and where the model looked.

    python app.py                                   # every shipped checkpoint, on http://127.0.0.1:7860
    python app.py --checkpoint DIR [--checkpoint DIR2] --host 0.0.0.0 --port 8080 [--share] [--threads 1]

API (gradio_client): "/predict" (model, image, question) -> top answers, a notice and the
details (OOD score and flag, unknown words, "not sure"); "/explain" -> occlusion heatmap;
"/attention" -> attention maps (attention models); "/compare" -> every served model's answer;
"/predict_many" (model, image, questions one per line) -> table.

The handlers below are plain functions of the served models and the inputs (unit-tested
without a server); `build_demo` only lays out the page and wires them. Concurrent /predict
requests share forward passes: each request is checked in its own worker thread, so a user's
mistake fails only that user's request, then a BatchingPredictor answers the waiting
requests (up to 16) together. Gradio's own `batch=True` is not used because one gr.Error
raised in a batched function fails every request of that batch.
"""

import argparse
import html
import logging
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gradio as gr

from vqa.errors import CheckpointError, InputError
from vqa.fair_queue import share_queue_fairly
from vqa.predict import DEFAULT_TOP_K, MAX_QUESTION_CHARS, Answer, BatchingPredictor, Predictor, percent
from vqa.worlds.registry import WORLDS, builtin_examples, builtin_palette

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_MODEL = "shapes-world-attention"  # the best shipped model, listed first
SCENE_WORLDS = {name for name, world in WORLDS.items() if world.scene_builder}  # served by "Build a scene"
MAX_BATCH_SIZE = 16
QUEUE_PER_SESSION, QUEUE_PER_HOST = 8, 64  # events one browser tab / one address may have waiting
MAX_QUESTIONS = 50  # per request of the "many questions" tab
EXAMPLE_COUNT = 8
UPLOAD_LIFETIME_S = 3600  # uploads are deleted from Gradio's cache an hour after they arrive
log = logging.getLogger("vqa.app")


@dataclass
class Served:
    """One loaded checkpoint: its Predictor and the batcher that shares its forward passes."""

    predictor: Predictor
    batcher: BatchingPredictor = field(init=False)

    def __post_init__(self):
        self.batcher = BatchingPredictor(self.predictor, MAX_BATCH_SIZE)


Models = dict[str, Served]


def load_models(folders: list[str | Path]) -> Models:
    """name (the folder's name) -> Served, in the order given."""
    return {Path(folder).name: Served(Predictor.from_checkpoint(folder)) for folder in folders}


def shipped_checkpoints(root: Path = CHECKPOINTS) -> list[Path]:
    """The checkpoint folders under checkpoints/, the default model first."""
    folders = sorted(p for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    return sorted(folders, key=lambda p: p.name != DEFAULT_MODEL)


# Handlers: plain functions, each turning a user mistake into gr.Error with its message.

def uploaded(value):
    """The file path in an image component's raw value (events run with preprocess=False).

    Gradio only hands over files that were uploaded to it; the image itself is opened by
    the Predictor (vqa.images.open_image), which owns the size limits and error messages.
    """
    return value.get("path") if isinstance(value, dict) else value


def user_error(error: InputError, image=None) -> gr.Error:
    """gr.Error with the Predictor's message, naming an upload by its own name, not the server's copy.

    Gradio's toast renders markup, so for the page the user's file name is escaped: a name such
    as '<a href=...>log in</a>.png' shows as text, never as a link or an image. API clients get
    the message as it is (see `refusal`).
    """
    message = str(error)
    if isinstance(image, dict) and image.get("path"):
        message = message.replace(image["path"], image.get("orig_name") or "the uploaded image")
    return refusal(message)


def from_api_client() -> bool:
    """True inside a request of an API client: gradio_client and @gradio/client send the header
    x-gradio-user: api, the page's own calls send "app" (Gradio 6). False outside any request."""
    from gradio.context import LocalContext

    headers = getattr(LocalContext.request.get(None), "headers", None) or {}
    return headers.get("x-gradio-user") == "api"


def refusal(message: str, title: str = "Cannot answer") -> gr.Error:
    """The error a user sees, logged as one line instead of a traceback. Markup is escaped for the
    page's toast, not for API clients, which would otherwise read '&lt;' for '<'."""
    log.info("refused: %s", message)
    return gr.Error(message if from_api_client() else html.escape(message), title=title, print_exception=False)


def served(models: Models, name: str) -> Served:
    if name not in models:
        raise refusal(f"no model named {name!r}; choose one of {', '.join(models)}")
    return models[name]


def notice(answer: Answer) -> str:
    """What the user should know before trusting the answer; empty when nothing."""
    lines = []
    if answer.unusual_image:
        lines.append("**This image looks unlike anything this model was trained on; its answers are guesses.**")
    if answer.unknown_words:
        lines.append("Never seen in training: " + ", ".join(html.escape(w) for w in answer.unknown_words) + ".")
    if answer.not_sure:
        lines.append(f"**Not sure**: the top answer's confidence ({answer.confidence:.0%}) is below this model's "
                     f"threshold ({answer.threshold:.0%}) for 1 % wrong answers; the top answers are still listed.")
    return "\n\n".join(lines)


def predict(models: Models, name: str, image, question):
    """(top answers, notice, details) for one image and question."""
    try:
        answer = served(models, name).batcher.answer(uploaded(image), question, DEFAULT_TOP_K)
    except InputError as error:
        raise user_error(error, image) from None
    return answer.answers, notice(answer), answer.details()


def explain(models: Models, name: str, image, question):
    """The occlusion heatmap of the top answer over the image."""
    try:
        return served(models, name).predictor.explain(uploaded(image), question).overlay
    except InputError as error:
        raise user_error(error, image) from None


def attention(models: Models, name: str, image, question) -> list:
    """[(overlay, caption)] per glimpse (of each hop) for an attention model; [] for a pooled one."""
    predictor = served(models, name).predictor
    try:
        overlays = predictor.attention(uploaded(image), question)
    except InputError as error:
        raise user_error(error, image) from None
    glimpses, hops = predictor.config.attention_glimpses, predictor.config.attention_hops
    return [(picture, f"hop {k // glimpses + 1}, glimpse {k % glimpses + 1}" if hops > 1 else f"glimpse {k + 1}")
            for k, picture in enumerate(overlays or [])]


def compare(models: Models, image, question) -> list[list]:
    """[model, top answer, confidence, notes] for every served model, on the same input."""
    rows = []
    for name, model in models.items():
        try:
            answer = model.batcher.answer(uploaded(image), question, 1)
        except InputError as error:
            raise user_error(error, image) from None
        top, probability = next(iter(answer.answers.items()))
        notes = [text for flag, text in ((answer.unusual_image, "unusual image"), (answer.not_sure, "not sure"),
                                         (bool(answer.unknown_words), "unknown words")) if flag]
        rows.append([name, top, round(probability, 4), ", ".join(notes)])
    return rows


def predict_many(models: Models, name: str, image, text) -> list[list]:
    """[question, top answer, confidence in %, notes] per line of `text`; the notes are the Ask tab's notices."""
    questions = [line.strip() for line in (text or "").splitlines() if line.strip()]
    try:
        if not questions:
            raise InputError("no questions: type one question per line")
        if len(questions) > MAX_QUESTIONS:
            raise InputError(f"{len(questions)} questions, over the limit of {MAX_QUESTIONS} per request")
        results = served(models, name).predictor.assess_many(uploaded(image), questions, top_k=1)
    except InputError as error:
        raise user_error(error, image) from None
    return [[q, next(iter(a.answers)), percent(a.confidence), "; ".join(a.notes())] for q, a in zip(questions, results)]


def blank(image) -> bool:
    """True when every pixel has the colour of the first one (an untouched canvas)."""
    return all(low == high for low, high in image.convert("RGB").getextrema())


def predict_sketch(models: Models, name: str, sketch, question):
    composite = sketch.get("composite") if isinstance(sketch, dict) else None
    try:
        if composite is None or blank(composite):
            raise InputError("nothing drawn: draw one or more coloured shapes, then ask")
        answer = served(models, name).batcher.answer(composite, question, DEFAULT_TOP_K)
        return answer.answers, notice(answer), served(models, name).predictor.explain(composite, question).overlay
    except InputError as error:
        raise user_error(error) from None


# The "Build a scene" tab: the shapes world's own renderer and question programs.

def new_scene(seed) -> tuple[list[list], object, list[list]]:
    """(object table, rendered image, suggested [question, true answer]) of a random scene."""
    from vqa.worlds import shapes

    scene = shapes.random_scene(int(seed or 0))
    return (shapes.scene_to_rows(scene), shapes.render_scene(scene),
            [list(pair) for pair in shapes.suggest_questions(scene, 6, int(seed or 0))])


def _scene(rows):
    from vqa.worlds import shapes

    table = rows.values.tolist() if hasattr(rows, "values") else rows
    try:
        return shapes.scene_from_rows([row for row in table if any(str(c).strip() for c in row)])
    except ValueError as error:
        raise refusal(str(error), "Cannot build the scene") from None


def pick_suggestion(event: gr.SelectData) -> str:
    """The question of the clicked row of the suggestions table."""
    return event.row_value[0] if event.row_value else ""


def render_rows(rows):
    """The scene of the edited table, rendered by the world's renderer."""
    from vqa.worlds import shapes

    return shapes.render_scene(_scene(rows))


def ask_scene(models: Models, name: str, rows, question):
    """(model's top answers, the true answer computed from the scene, notice) for a built scene."""
    from vqa.worlds import shapes

    scene = _scene(rows)
    try:
        answer = served(models, name).batcher.answer(shapes.render_scene(scene), question, DEFAULT_TOP_K)
    except InputError as error:
        raise user_error(error) from None
    verdict = shapes.verdict(scene, question, next(iter(answer.answers)))
    return answer.answers, verdict, notice(answer)


# The page.

def model_markdown(facts: dict) -> str:
    lines = [f"### {facts.get('checkpoint', 'The model')}", "", f"- **Architecture**: {facts['architecture']}"]
    if facts.get("image_size"):
        lines.append(f"- **Input**: images are letterboxed whole into {facts['image_size']}x{facts['image_size']} pixels")
    trained = f"- **Trained on**: {facts['dataset']}"
    if "train_questions" in facts:
        trained += f" ({facts['train_questions']} training questions)"
    lines.append(trained)
    if "test_accuracy" in facts:
        measured = f"- **Measured accuracy**: {facts['test_accuracy']} % VQA accuracy"
        if "test_questions" in facts:
            measured += f" on {facts['test_questions']} test questions"
        lines.append(measured)
    shown = ", ".join(facts["answers"][:40]) + (" ..." if facts["num_answers"] > 40 else "")
    lines.append(f"- **Answers it can give ({facts['num_answers']})**: {shown}")
    lines.append(f"- **Parameters**: {facts['parameters']:,}")
    lines += ["", f"It knows only what {facts['dataset']} holds: on other images its answers are guesses, and it "
              "says so when an image looks unlike its training images."]
    return "\n".join(lines)


def _model_choice(models: Models, elem_id: str, datasets: set[str] = frozenset()) -> gr.Dropdown:
    """The model selector, on the first model trained on one of `datasets` if any, else the first one."""
    names = list(models)
    preferred = [n for n in names if models[n].predictor.describe()["dataset"] in datasets]
    return gr.Dropdown(names, value=(preferred or names)[0], label="Model", interactive=len(names) > 1,
                       elem_id=elem_id)


def _ask_tab(models: Models, examples: list[list]):
    with gr.Tab("Ask"):
        with gr.Row():
            with gr.Column():
                model = _model_choice(models, "model")
                image = gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"], label="Image",
                                 height=300, elem_id="image")
                question = gr.Textbox(label="Question", placeholder="how many circles are there?", lines=1,
                                      elem_id="question")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                if examples:
                    gr.Examples(examples, inputs=[image, question], examples_per_page=4, elem_id="examples",
                                label="Test images of the model's dataset: click one, then Ask")
            with gr.Column():
                warning = gr.Markdown(elem_id="notice")
                answers = gr.Label(num_top_classes=DEFAULT_TOP_K, label="Top answers", elem_id="answers")
                details = gr.JSON(label="Details", visible=False)
                heatmap = gr.Image(label="Where the model looked (occlusion)", type="pil", interactive=False,
                                   height=300, elem_id="heatmap", format="png")
                glimpses = gr.Gallery(label="Attention maps (attention models)", columns=2, height=220,
                                      elem_id="attention", format="png")
                compare_button = gr.Button("Ask every model", elem_id="compare")
                table = gr.Dataframe(headers=["model", "answer", "confidence", "notes"],
                                     datatype=["str", "str", "number", "str"], label="Every model's answer",
                                     interactive=False, elem_id="compare-table")
    inputs = [model, image, question]
    gr.on([ask.click, question.submit], partial(predict, models), inputs, [answers, warning, details],
          api_name="predict", preprocess=False, concurrency_limit=MAX_BATCH_SIZE, concurrency_id="predict") \
        .success(partial(explain, models), inputs, heatmap, api_name="explain", preprocess=False,
                 concurrency_limit=2, concurrency_id="explain") \
        .success(partial(attention, models), inputs, glimpses, api_name="attention", preprocess=False,
                 concurrency_limit=2, concurrency_id="attention")
    # Answers never wait behind occlusion heatmaps (a forward pass per patch): only explain and Draw
    # share that group; one user's 12 heatmaps once held "Ask every model" for 25 s.
    compare_button.click(partial(compare, models), [image, question], table, api_name="compare", preprocess=False,
                         concurrency_limit=2, concurrency_id="compare")


def _many_tab(models: Models, examples: list[list]):
    with gr.Tab("Many questions"):
        gr.Markdown("One question per line; the CNN reads the image once for all of them.")
        with gr.Row():
            with gr.Column():
                model = _model_choice(models, "many-model")
                image = gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"], label="Image", height=300)
                questions = gr.Textbox(label="Questions, one per line", lines=6,
                                       placeholder="how many circles are there?\nis there a red square?")
                ask = gr.Button("Ask all", variant="primary")
            table = gr.Dataframe(headers=["question", "answer", "confidence", "notes"],
                                 datatype=["str", "str", "str", "str"], label="Answers", interactive=False, wrap=True)
    gr.on([ask.click, questions.submit], partial(predict_many, models), [model, image, questions], table,
          api_name="predict_many", preprocess=False, concurrency_limit=2)


def _draw_tab(models: Models, palette: list[str]):
    with gr.Tab("Draw"):
        gr.Markdown("Pick the brush (left of the canvas) and a colour, draw one or more filled shapes, then ask.")
        with gr.Row():
            with gr.Column():
                model = _model_choice(models, "draw-model")
                sketch = gr.Sketchpad(type="pil", image_mode="RGB", canvas_size=(256, 256), label="Sketch",
                                      brush=gr.Brush(colors=palette, color_mode="fixed", default_size=12))
                question = gr.Textbox(label="Question", placeholder="how many things are there?")
                ask = gr.Button("Ask", variant="primary")
            with gr.Column():
                warning = gr.Markdown()
                answers = gr.Label(num_top_classes=DEFAULT_TOP_K, label="Top answers")
                heatmap = gr.Image(label="Where the model looked", type="pil", interactive=False, height=300,
                                   format="png")
    gr.on([ask.click, question.submit], partial(predict_sketch, models), [model, sketch, question],
          [answers, warning, heatmap], api_visibility="private", concurrency_limit=2, concurrency_id="explain")


def _scene_tab(models: Models):
    with gr.Tab("Build a scene"):
        gr.Markdown("Generate a scene of the shapes world, or edit its objects (x, y in pixels of a 128-pixel "
                    "image), then ask a suggested question or your own: the true answer is computed from the scene.")
        with gr.Row():
            with gr.Column():
                model = _model_choice(models, "scene-model", SCENE_WORLDS)
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="scene-seed")
                generate = gr.Button("New random scene", elem_id="scene-new")
                rows = gr.Dataframe(headers=["shape", "color", "size", "material", "x", "y"],
                                    datatype=["str", "str", "str", "str", "number", "number"],
                                    interactive=True, label="Objects", elem_id="scene-table")
                render = gr.Button("Render the table", elem_id="scene-render")
            with gr.Column():
                picture = gr.Image(label="Scene", type="pil", interactive=False, height=300, width=300,
                                   elem_id="scene-image", format="png")
                # Wrapped text in fixed columns: the "true answer" column stays in view, no sideways scrolling.
                suggestions = gr.Dataframe(headers=["question", "true answer"], label="Suggested questions",
                                           interactive=False, elem_id="scene-suggestions", wrap=True,
                                           column_widths=["78%", "22%"])
                question = gr.Textbox(label="Question", placeholder="how many red things are there?",
                                      elem_id="scene-question")
                ask = gr.Button("Ask", variant="primary", elem_id="scene-ask")
                answers = gr.Label(num_top_classes=3, label="Model's answers", elem_id="scene-answers")
                truth = gr.Markdown(elem_id="scene-truth")
                warning = gr.Markdown()
    generate.click(new_scene, seed, [rows, picture, suggestions], api_name="new_scene")
    render.click(render_rows, rows, picture, api_name="render_scene")
    suggestions.select(pick_suggestion, None, question, api_visibility="private")
    gr.on([ask.click, question.submit], partial(ask_scene, models), [model, rows, question],
          [answers, truth, warning], api_name="ask_scene", concurrency_limit=MAX_BATCH_SIZE,
          concurrency_id="predict")


def build_demo(models: Models) -> gr.Blocks:
    """The page over already loaded models (the first one is the default)."""
    first = next(iter(models.values())).predictor
    dataset = first.describe()["dataset"]
    examples = builtin_examples(dataset, EXAMPLE_COUNT)
    with gr.Blocks(title="Visual question answering", delete_cache=(600, UPLOAD_LIFETIME_S)) as demo:
        gr.Markdown(
            "# Visual question answering\n"
            "A CNN reads the image, an LSTM reads the question, and the model picks an answer. "
            "Upload, paste or photograph an image (or click an example below), ask a question "
            f"(at most {MAX_QUESTION_CHARS} characters) and press **Ask** or Enter. Uploads are deleted "
            f"after {UPLOAD_LIFETIME_S // 60} minutes."
        )
        _ask_tab(models, examples)
        _many_tab(models, examples)
        _draw_tab(models, builtin_palette(dataset))
        if any(m.predictor.describe()["dataset"] in SCENE_WORLDS for m in models.values()):
            _scene_tab(models)
        with gr.Accordion("About the models", open=False):
            for served_model in models.values():
                gr.Markdown(model_markdown(served_model.predictor.describe()), elem_id="model-card")
    return demo


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Visual question answering demo (Gradio).")
    parser.add_argument("--checkpoint", action="append", default=None,
                        help="checkpoint folder to serve (repeat for several; default: every one in checkpoints/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per forward pass (1: requests run side by side instead of "
                             "contending for cores; measured 22 ms server CPU per request, 177 ms with 2 on 2 cores)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    try:
        models = load_models(args.checkpoint or shipped_checkpoints())
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not models:
        print(f"error: no checkpoint in {CHECKPOINTS}; give --checkpoint DIR", file=sys.stderr)
        return 2
    # api_open=False: REST routes (/run/predict) would answer outside the queue and its limits. No
    # allowed_paths: examples are copied into Gradio's cache when the app is built, so the server
    # serves nothing but its cache. Each session and address get a fair share of the queue's places.
    demo = build_demo(models).queue(max_size=256, api_open=False)
    share_queue_fairly(demo, QUEUE_PER_SESSION, QUEUE_PER_HOST).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size="50mb",
        allowed_paths=[], show_error=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
