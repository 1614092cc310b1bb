"""A trained model's card: the facts measured once training is over (validation, the test split
scored from pixels beside a question-only baseline, per family and template), its curves, and
the checkpoint folder written with them."""

import json
from pathlib import Path

from transformers import Trainer

from .batching import ImageSource
from .checkpoint import render_card, save_checkpoint
from .config import VQAConfig
from .evaluation import predict_split
from .metrics import blind_baseline, evaluate_results
from .model import VQAModel, architecture
from .records import VQASplit
from .reliability.fit import RELIABILITY_FILES
from .text import QuestionTokenizer


def plot_curves(log_history: list[dict], path: Path) -> Path:
    """Loss, validation accuracy, and validation accuracy per question type (what was learned when)."""
    from .plots import pyplot

    plt = pyplot()

    train = [(h["epoch"], h["loss"]) for h in log_history if "loss" in h]
    val_loss = [(h["epoch"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    val_acc = [(h["epoch"], h["eval_vqa_accuracy"]) for h in log_history if "eval_vqa_accuracy" in h]
    prefix = "eval_vqa_accuracy_"
    families = sorted({k[len(prefix):] for h in log_history for k in h if k.startswith(prefix)})
    fig, axes = plt.subplots(1, 3 if families else 2, figsize=(15 if families else 10, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    if train:
        ax_loss.plot(*zip(*train), label="train")
    if val_loss:
        ax_loss.plot(*zip(*val_loss), "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss", yscale="log")  # side losses start 10x higher
    ax_loss.legend()
    if val_acc:
        ax_acc.plot(*zip(*val_acc), "o-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="VQA accuracy (%)", title="Validation accuracy")
    ax_acc.grid(alpha=0.3)
    if families:
        for family in families:
            points = [(h["epoch"], h[prefix + family]) for h in log_history if prefix + family in h]
            axes[2].plot(*zip(*points), ".-", label=family)
        axes[2].set(xlabel="epoch", ylabel="VQA accuracy (%)", title="Validation accuracy per question type")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def official_scores(model: VQAModel, tokenizer: QuestionTokenizer, split: VQASplit, source: ImageSource) -> dict:
    """The official metric (overall, per answer type, per question type) of the model on `split`."""
    predictions = predict_split(model, tokenizer, split, feature_cache=source.feature_cache, progress=False)
    return evaluate_results(predictions.results, split)


def subset_accuracy(scores: dict, split: VQASplit, keep) -> float:
    """Mean official accuracy (%) over the questions of `split` for which keep(record) is true."""
    values = [scores["perQuestion"][r["question_id"]] for r in split.records if keep(r)]
    return round(sum(values) / len(values), 2) if values else float("nan")


def measure(run, trainer: Trainer, val_accuracy: float) -> dict:
    """The card's facts of a `vqa.trainer.Run` (it writes nothing): validation accuracy (`trainer.evaluate()`'s), and
    the test split scored once (after every choice was made on validation), beside a
    question-only baseline."""
    options, model = run.options, run.model
    facts = {
        "dataset": options.dataset if options.dataset != "files" else run.train.name,
        "backbone": model.config.backbone, "attention_glimpses": model.config.attention_glimpses,
        "answers": len(model.config.label2id), "train_questions": len(trainer.train_dataset),
        "val_questions": len(trainer.eval_dataset), "val_accuracy": val_accuracy,
    }
    if run.skipped:
        facts["skipped_images"] = len(run.skipped)
    test = run.test
    if test is not None and test.has_answers:
        scores = official_scores(model, run.tokenizer, test, run.sources["test"])
        facts.update({"test_questions": len(test.records), "test_accuracy": scores["overall"],
                      "test_accuracy_per_answer_type": scores["perAnswerType"],
                      "test_accuracy_per_question_type": scores["perQuestionType"]})
        if "perTemplate" in scores:
            facts["test_accuracy_per_template"] = scores["perTemplate"]
        blind = blind_baseline(run.train.records, test.records)
        facts["blind_test_accuracy"] = blind["overall"]
        facts["blind_test_accuracy_per_question_type"] = blind["per_family"]
        if any("relation" in r for r in test.records):  # spatial-relation questions, where pooling fails
            facts["test_accuracy_relation_questions"] = subset_accuracy(scores, test, lambda r: r.get("relation"))
    stage1 = stage1_facts(options.backbone_weights)
    if stage1:
        facts["stage1"] = stage1
    facts.update({"epochs": options.epochs, "seed": options.seed, "init_from": options.init_from,
                  "training_time_s": round(run.clock.total()), "command": run.clock.command})
    return facts


def stage1_facts(backbone_weights: str | None) -> dict | None:
    """What the stage-1 encoder's card says (vqa/scene_encoder.py writes encoder.json beside its
    weights): its command, seed, time and held-out accuracy, for this model's card."""
    settings = Path(backbone_weights).with_name("encoder.json") if backbone_weights else None
    if settings is None or not settings.is_file():
        return None
    facts = json.loads(settings.read_text())
    return {k: facts[k] for k in ("command", "seed", "training_time_s", "val_accuracy", "train_scenes") if k in facts}


def save_run(run, trainer: Trainer, facts: dict) -> Path:
    work, model = run.work, run.model
    extra = {"training_curves.png": plot_curves(trainer.state.log_history, work / "training_curves.png")}
    extra.update({name: work / "reliability" / name for name in RELIABILITY_FILES})
    if run.skipped:
        (work / "skipped_images.json").write_text(json.dumps(run.skipped, indent=2))
        extra["skipped_images.json"] = work / "skipped_images.json"
    card = render_card(facts, model_card_body(facts, model.config))
    out = save_checkpoint(model, run.tokenizer, run.options.output_dir, card, extra_files=extra,
                          half=run.options.save_half)
    print(f"saved {out}: " + ", ".join(f"{k}={facts[k]}" for k in ("val_accuracy", "test_accuracy") if k in facts))
    return out


def _accuracy_table(title: str, scores: dict, blind: dict | None = None) -> list[str]:
    if blind is None:
        rows = [f"| {name} | {value:.2f} |" for name, value in sorted(scores.items())]
        return ["", f"| {title} | test VQA accuracy (%) |", "|---|---|", *rows]
    rows = [f"| {name} | {value:.2f} | {blind.get(name, float('nan')):.2f} |" for name, value in sorted(scores.items())]
    return ["", f"| {title} | test VQA accuracy (%) | question-only baseline (%) |", "|---|---|---|", *rows]


def model_card_body(facts: dict, config: VQAConfig) -> str:
    lines = [
        f"# VQA model: {architecture(config)}",
        "",
        'Antol et al. 2015, "deeper LSTM Q + norm I": L2-normalised CNN features and the LSTM question',
        "vector are fused by elementwise product and classified over the answer vocabulary.",
        "",
        f"- Dataset: {facts['dataset']} ({facts['train_questions']} training questions, {facts['val_questions']} validation)",
        f"- Answers: {facts['answers']}: {', '.join(config.answers[:20])}{' ...' if facts['answers'] > 20 else ''}",
        f"- Validation VQA accuracy: {facts['val_accuracy']} %",
    ]
    if "test_accuracy" in facts:
        lines.append(f"- Test VQA accuracy: {facts['test_accuracy']} % ({facts['test_questions']} questions)")
    lines.append(f"- Seed: {facts['seed']}, training time: {facts['training_time_s']} s")
    if "test_accuracy_per_answer_type" in facts:
        lines += _accuracy_table("answer type", facts["test_accuracy_per_answer_type"])
        lines += _accuracy_table("question type", facts["test_accuracy_per_question_type"],
                                 facts.get("blind_test_accuracy_per_question_type"))
    if "test_accuracy_per_template" in facts:
        lines += _accuracy_table("template", facts["test_accuracy_per_template"])
    if "blind_test_accuracy" in facts:
        lines.append(f"\nQuestion-only baseline (most frequent training answer of the same question text): "
                     f"{facts['blind_test_accuracy']} % overall.")
    if "test_accuracy_relation_questions" in facts:
        lines.append(f"Questions with a spatial relation: {facts['test_accuracy_relation_questions']} %.")
    if "stage1" in facts:
        stage1 = facts["stage1"]
        held_out = ", ".join(f"{k} {v:.2f} %" for k, v in stage1.get("val_accuracy", {}).items())
        lines += ["", "Two stages: the CNN first learned the scenes' objects from their graphs (stage 1, "
                  f"{stage1.get('training_time_s')} s, seed {stage1.get('seed')}; held out: {held_out}), "
                  "then stayed frozen while the question side trained on its cached maps (stage 2).", "",
                  "Reproduce with stage 1, then stage 2:", "", "```", stage1.get("command", ""), facts["command"], "```"]
    else:
        lines += ["", "Reproduce with:", "", "```", facts["command"], "```"]
    lines += ["", "![training curves](training_curves.png)"]
    return "\n".join(lines)
