"""report.md: what an evaluation found, for a person to read, with a chart per answer type."""

from collections import Counter
from pathlib import Path

from .records import VQASplit

REPORT_FILE = "report.md"
CHART_FILE = "accuracy_per_answer_type.png"
SHOWN_TYPES = 5  # best and worst question types listed
SHOWN_ERRORS = 10  # most frequent wrong answers listed
SHOWN_SKIPPED = 20


def _cell(text) -> str:
    """A markdown table cell: pipes escaped, line breaks flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ").replace("\r", " ") or " "


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _counts(records: list[dict], key: str) -> Counter:
    return Counter(r[key] for r in records)


def plot_answer_type_accuracy(metrics: dict, counts: Counter, path: str | Path) -> Path:
    from .plots import pyplot

    plt = pyplot()

    types = list(metrics["perAnswerType"])
    values = [metrics["perAnswerType"][t] for t in types]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.4 * len(types) + 1.5), 3.6))
    bars = ax.bar(range(len(types)), values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2)
    ax.axhline(metrics["overall"], color="tab:red", linestyle="--", linewidth=1)  # overall accuracy
    ax.set_xticks(range(len(types)), [f"{t}\n({counts[t]} q.)" for t in types])
    ax.set(ylim=(0, 108), ylabel="VQA accuracy (%)",
           title=f"Accuracy per answer type (overall {metrics['overall']:.2f} %, dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def frequent_errors(split: VQASplit, results: list[dict], metrics: dict, top: int = SHOWN_ERRORS) -> list[tuple]:
    """[(prediction, most common human answer, times, an example question)] over questions scored 0."""
    answers = {r["question_id"]: r["answer"] for r in results}
    pairs, examples = Counter(), {}
    for record in split.records:
        qid = record["question_id"]
        if metrics["perQuestion"].get(qid, 100.0) == 0.0:
            pair = (answers[qid], record["multiple_choice_answer"])
            pairs[pair] += 1
            examples.setdefault(pair, record["question"])
    return [(p, h, n, examples[(p, h)]) for (p, h), n in pairs.most_common(top)]


def format_summary(metrics: dict, questions: int) -> str:
    """The lines the command line prints at the end."""
    lines = [f"overall accuracy: {metrics['overall']:.2f} % ({questions} questions)"]
    lines += [f"  {t}: {v:.2f} %" for t, v in metrics["perAnswerType"].items()]
    return "\n".join(lines)


RISK_COVERAGE_FILE = "risk_coverage.png"


def _abstention_lines(figures: dict) -> list[str]:
    """Selective answering: how many questions can be answered at a given risk of being wrong."""
    lines = ["", "## Answering only when confident", "",
             "Risk = 1 - VQA accuracy of the questions answered, when only answers at or above a confidence "
             "threshold are given (Whitehead et al. 2022, *Reliable VQA*).", ""]
    rows = [[f"coverage at {risk} risk", f"{v['coverage']:.2f} %", f"{v['threshold']:.4f}"]
            for risk, v in figures["coverage_at_risk"].items()]
    rows += [[f"effective reliability Phi ({c})", f"{v['phi']:.2f}", f"{v['threshold']:.4f}"]
             for c, v in figures["effective_reliability"].items()]
    rows.append(["area under the risk-coverage curve", f"{figures['aurc']:.2f}", "-"])
    lines += _table(["figure", "value", "threshold"], rows)
    return lines + ["", f"![risk-coverage curve]({RISK_COVERAGE_FILE})"]


def write_report(out: str | Path, split: VQASplit, results: list[dict], metrics: dict | None,
                 skipped: list[dict], source: dict) -> Path:
    out = Path(out)
    skipped_questions = sum(len(s["question_ids"]) for s in skipped)
    lines = [f"# VQA evaluation: {split.name}", ""]
    lines += [f"- {k}: `{v}`" for k, v in source.items()]
    lines.append(f"- Questions answered: {len(results)} of {len(split.records)}")
    if skipped:
        lines.append(f"- **{len(skipped)} image{'s' if len(skipped) != 1 else ''} could not be read and "
                     f"{'were' if len(skipped) != 1 else 'was'} skipped** "
                     f"({skipped_questions} questions unanswered and not scored; listed below)")
    if metrics is None:
        (out / CHART_FILE).unlink(missing_ok=True)
        lines += ["", "No annotations: predictions only (results.json), no accuracy.", "",
                  "## Most frequent predicted answers", ""]
        counts = Counter(r["answer"] for r in results)
        lines += _table(["answer", "questions"], [[a, n] for a, n in counts.most_common(SHOWN_ERRORS)])
    else:
        scored = [r for r in split.records if r["question_id"] in metrics["perQuestion"]]
        answer_counts, type_counts = _counts(scored, "answer_type"), _counts(scored, "question_type")
        plot_answer_type_accuracy(metrics, answer_counts, out / CHART_FILE)
        lines += [
            f"- Overall accuracy: **{metrics['overall']:.2f} %** over {len(scored)} questions "
            "(official VQA metric: GT-Vision-Lab/VQA vqaEval.py)",
            "", "## Accuracy per answer type", "",
        ]
        lines += _table(["answer type", "questions", "accuracy (%)"],
                        [[t, answer_counts[t], f"{v:.2f}"] for t, v in metrics["perAnswerType"].items()])
        lines += ["", f"![accuracy per answer type]({CHART_FILE})", "", "## Question types", ""]
        ranked = sorted(metrics["perQuestionType"].items(), key=lambda kv: (-kv[1], -type_counts[kv[0]], kv[0]))
        header = ["question type", "questions", "accuracy (%)"]
        if len(ranked) <= 2 * SHOWN_TYPES:
            lines += _table(header, [[t, type_counts[t], f"{v:.2f}"] for t, v in ranked])
        else:
            lines += [f"Best {SHOWN_TYPES} of {len(ranked)}:", ""]
            lines += _table(header, [[t, type_counts[t], f"{v:.2f}"] for t, v in ranked[:SHOWN_TYPES]])
            lines += ["", f"Worst {SHOWN_TYPES}:", ""]
            lines += _table(header, [[t, type_counts[t], f"{v:.2f}"] for t, v in ranked[-SHOWN_TYPES:]])
        if "perTemplate" in metrics:
            template_counts = _counts(scored, "template")
            lines += ["", "## Accuracy per template", "",
                      "Each generator template (the `template` field of the annotations): which kinds of question "
                      "are learned.", ""]
            lines += _table(["template", "questions", "accuracy (%)"],
                            [[t, template_counts[t], f"{v:.2f}"] for t, v in metrics["perTemplate"].items()])
        errors = frequent_errors(split, results, metrics)
        wrong = sum(1 for v in metrics["perQuestion"].values() if v == 0.0)
        lines += ["", "## Most frequent wrong answers", "",
                  f"{wrong} questions scored 0; the most frequent (prediction, most common human answer) pairs:", ""]
        lines += _table(["prediction", "most common human answer", "times", "example question"],
                        [list(e) for e in errors])
        if "abstention" in metrics:
            lines += _abstention_lines(metrics["abstention"])
    if skipped:
        lines += ["", "## Skipped images", ""]
        lines += _table(["image id", "file", "questions", "error"],
                        [[s["image_id"], s["path"] or "-", len(s["question_ids"]), s["error"]]
                         for s in skipped[:SHOWN_SKIPPED]])
        if len(skipped) > SHOWN_SKIPPED:
            lines += ["", f"... and {len(skipped) - SHOWN_SKIPPED} more: all are in skipped_images.json."]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path
