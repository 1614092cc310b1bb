"""The Gradio demo: ask a question about an image, see the top answers and where the model looked.

    python app.py                                   # checkpoints/easy-vqa on http://127.0.0.1:7860
    python app.py --checkpoint DIR --host 0.0.0.0 --port 8080 [--share] [--threads 1]

API (gradio_client): "/predict" (image, question) -> top answers, "/explain" (image, question)
-> heatmap, "/predict_many" (image, questions one per line) -> table.

Concurrent /predict requests share forward passes: each request is checked in its own worker
thread, so a user's mistake fails only that user's request (gr.Error with the Predictor's
message), then a BatchingPredictor runs the waiting requests (up to 16) together. Gradio's
own `batch=True` is not used because one gr.Error raised in a batched function fails every
request of that batch.
"""

import argparse
import sys
from pathlib import Path

import gradio as gr
import torch

from vqa.errors import CheckpointError, InputError
from vqa.predict import DEFAULT_TOP_K, MAX_QUESTION_CHARS, BatchingPredictor, Predictor

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "easy-vqa"
MAX_BATCH_SIZE = 16
MAX_QUESTIONS = 50  # per request of the "many questions" tab
EXAMPLE_COUNT = 8
EASY_VQA_COLOURS = ["#ff0000", "#00ff00", "#0000ff", "#ffff00", "#000000", "#a52a2a", "#808080", "#008080"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Visual question answering demo (Gradio).")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per forward pass (1: requests run side by side instead of "
                             "contending for cores; measured 22 ms server CPU per request, 177 ms with 2 on 2 cores)")
    return parser.parse_args(argv)


def uploaded(value):
    """The file path in an image component's raw value (events run with preprocess=False).

    Gradio only hands over files that were uploaded to it; the image itself is opened by
    the Predictor (vqa.images.open_image), which owns the size limits and error messages.
    """
    if isinstance(value, dict):
        return value.get("path")
    return value


def user_error(error: InputError, image=None) -> gr.Error:
    """gr.Error with the Predictor's message, naming an upload by its own name, not the server's copy."""
    message = str(error)
    if isinstance(image, dict) and image.get("path"):
        message = message.replace(image["path"], image.get("orig_name") or "the uploaded image")
    return gr.Error(message, title="Cannot answer")


def easy_vqa_examples(count: int = EXAMPLE_COUNT) -> list[list[str]]:
    """[image path, question] pairs from the easy-VQA test split, one question per image."""
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    examples, seen = [], set()
    for question, image_id in zip(questions, image_ids):
        if image_id not in seen and question.startswith(("what", "is there a", "does the image contain")):
            seen.add(image_id)
            examples.append([paths[image_id], question])
        if len(examples) == count:
            break
    return examples


def model_markdown(facts: dict) -> str:
    lines = ["### About the model", ""]
    lines.append(f"- **Architecture**: {facts['backbone']} CNN + 2-layer LSTM, fused by elementwise product "
                 "(Antol et al. 2015, \"deeper LSTM Q + norm I\")")
    if facts.get("image_size"):
        lines.append(f"- **Input**: images are resized to {facts['image_size']}x{facts['image_size']} pixels")
    trained = f"- **Trained on**: {facts['dataset']}"
    if "train_questions" in facts:
        trained += f" ({facts['train_questions']} training questions)"
    lines.append(trained)
    if "test_accuracy" in facts:
        measured = f"- **Measured accuracy**: {facts['test_accuracy']} % VQA accuracy"
        if "test_questions" in facts:
            measured += f" on {facts['test_questions']} test questions"
        lines.append(measured)
    lines.append(f"- **Answers it can give ({facts['num_answers']})**: {', '.join(facts['answers'])}")
    lines.append(f"- **Parameters**: {facts['parameters']:,}")
    lines.append("")
    lines.append("It only knows these answers and was trained on simple coloured shapes: on photos its "
                 "answers are guesses. The heatmap shows occlusion sensitivity: how much the model's confidence in "
                 "its top answer changes when that part of the image is covered.")
    return "\n".join(lines)


def blank(image) -> bool:
    """True when every pixel has the colour of the first one (an untouched canvas)."""
    extrema = image.convert("RGB").getextrema()
    return all(low == high for low, high in extrema)


def build_demo(predictor: Predictor) -> gr.Blocks:
    batcher = BatchingPredictor(predictor, MAX_BATCH_SIZE)

    def predict(image, question):
        try:
            return batcher.answer(uploaded(image), question, DEFAULT_TOP_K)
        except InputError as error:
            raise user_error(error, image) from None

    def explain(image, question):
        try:
            return predictor.explain(uploaded(image), question).overlay
        except InputError as error:
            raise user_error(error, image) from None

    def predict_many(image, text):
        questions = [line.strip() for line in (text or "").splitlines() if line.strip()]
        try:
            if not questions:
                raise InputError("no questions: type one question per line")
            if len(questions) > MAX_QUESTIONS:
                raise InputError(f"{len(questions)} questions, over the limit of {MAX_QUESTIONS} per request")
            results = predictor.answer_many(uploaded(image), questions, top_k=1)
        except InputError as error:
            raise user_error(error, image) from None
        return [[q, *next(iter(r.items()))] for q, r in zip(questions, results)]

    def predict_sketch(sketch, question):
        composite = sketch.get("composite") if isinstance(sketch, dict) else None
        try:
            if composite is None or blank(composite):
                raise InputError("nothing drawn: draw a coloured shape, then ask")
            answers = batcher.answer(composite, question, DEFAULT_TOP_K)
            return answers, predictor.explain(composite, question).overlay
        except InputError as error:
            raise user_error(error) from None

    examples = easy_vqa_examples()
    with gr.Blocks(title="Visual question answering") as demo:
        gr.Markdown(
            "# Visual question answering\n"
            "A CNN reads the image, an LSTM reads the question, and the model picks an answer. "
            f"Upload, paste or photograph an image (or click an example below), ask a question "
            f"(at most {MAX_QUESTION_CHARS} characters) and press **Ask** or Enter."
        )
        with gr.Tab("Ask"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"], label="Image",
                                     height=300, elem_id="image")
                    question = gr.Textbox(label="Question", placeholder="what color is the shape?", lines=1,
                                          elem_id="question")
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    gr.Examples(examples, inputs=[image, question], examples_per_page=4, elem_id="examples",
                                label="easy-VQA test images: click one, then Ask")
                with gr.Column():
                    answers = gr.Label(num_top_classes=DEFAULT_TOP_K, label="Top answers", elem_id="answers")
                    heatmap = gr.Image(label="Where the model looked", type="pil", interactive=False, height=300,
                                       elem_id="heatmap", format="png")
        with gr.Tab("Many questions"):
            gr.Markdown("One question per line; the CNN reads the image once for all of them.")
            with gr.Row():
                with gr.Column():
                    many_image = gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"], label="Image",
                                          height=300)
                    many_questions = gr.Textbox(label="Questions, one per line", lines=6,
                                                placeholder="what color is the shape?\nis there a circle?")
                    many_ask = gr.Button("Ask all", variant="primary")
                many_table = gr.Dataframe(headers=["question", "answer", "confidence"],
                                          datatype=["str", "str", "number"], label="Answers", interactive=False)
            gr.Examples([[examples[0][0], "what color is the shape?\nwhat shape is in the image?\n"
                          "is there a circle?\nis there a triangle?\nis there not a red shape?"]],
                        inputs=[many_image, many_questions])
        with gr.Tab("Draw"):
            gr.Markdown("Pick the brush (left of the canvas) and a colour, draw a filled shape, then ask about it.")
            with gr.Row():
                with gr.Column():
                    sketch = gr.Sketchpad(type="pil", image_mode="RGB", canvas_size=(256, 256), label="Sketch",
                                          brush=gr.Brush(colors=EASY_VQA_COLOURS, color_mode="fixed",
                                                         default_size=12))
                    sketch_question = gr.Textbox(label="Question", placeholder="what color is the shape?")
                    sketch_ask = gr.Button("Ask", variant="primary")
                with gr.Column():
                    sketch_answers = gr.Label(num_top_classes=DEFAULT_TOP_K, label="Top answers")
                    sketch_heatmap = gr.Image(label="Where the model looked", type="pil", interactive=False,
                                              height=300, format="png")
        gr.Markdown(model_markdown(predictor.describe()), elem_id="model-card")

        gr.on([ask.click, question.submit], predict, [image, question], answers, api_name="predict",
              preprocess=False, concurrency_limit=MAX_BATCH_SIZE, concurrency_id="predict") \
            .success(explain, [image, question], heatmap, api_name="explain", preprocess=False,
                     concurrency_limit=2, concurrency_id="explain")
        gr.on([many_ask.click, many_questions.submit], predict_many, [many_image, many_questions], many_table,
              api_name="predict_many", preprocess=False, concurrency_limit=2)
        gr.on([sketch_ask.click, sketch_question.submit], predict_sketch, [sketch, sketch_question],
              [sketch_answers, sketch_heatmap], api_visibility="private", concurrency_limit=2,
              concurrency_id="explain")
    return demo


def load_predictor(folder: str) -> Predictor:
    try:
        return Predictor.from_checkpoint(folder)
    except CheckpointError as error:
        if __name__ == "__main__":
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise


args = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
torch.set_num_threads(args.threads)
demo = build_demo(load_predictor(args.checkpoint))

if __name__ == "__main__":
    # No allowed_paths: the examples are copied into Gradio's cache when the app is built, so the
    # server needs to serve nothing but its cache (never the repository or the checkpoint).
    demo.queue(max_size=256).launch(server_name=args.host, server_port=args.port, share=args.share,
                                    max_file_size="50mb", allowed_paths=[], show_error=False)
