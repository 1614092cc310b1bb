"""Answer normalisation and soft scores, exactly as the official VQA evaluation does them.

Source: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py (latest
version, "Fixed processing answers bug"). This module is the one home of these rules:
training targets (`answer_scores`) and the metric (`vqa.metrics`) both call it.
"""

import re
from collections import Counter
from functools import lru_cache
from typing import Iterable, Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!"]
# The official pattern reads "(?!<=\d)": a typo for a look-behind, so it constrains nothing.
# A period is dropped unless a digit follows it ("3.5" keeps it, "yes." loses it).
# re.ASCII: the official script is Python 2, where \d means 0-9 only.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)", re.ASCII)
# The official script passes re.UNICODE (== 32) as `count` to re.sub: at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def clean_whitespace(text: str) -> str:
    """The step the official script applies to every answer, always."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@lru_cache(maxsize=1 << 16)  # answers repeat a lot: VQA v2 has ~4.4M of them
def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # Punctuation next to a space, or anywhere in text holding a digit-comma-digit
        # ("1,000"), is deleted; otherwise it becomes a space ("t-shirt" -> "t shirt").
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


@lru_cache(maxsize=1 << 16)  # answers repeat a lot: VQA v2 has ~4.4M of them
def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


@lru_cache(maxsize=1 << 16)  # answers repeat a lot: VQA v2 has ~4.4M of them
def normalize_answer(text: str) -> str:
    """Full official normalisation of one answer ("Two dogs." -> "2 dogs")."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


HUMAN_ANSWERS = 10  # answers per question in VQA v1/v2, which the metric below is built for


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official accuracy of one predicted answer against the (10) human answers.

    acc = mean over the leave-one-out subsets of the humans of min(1, matches / 3).
    The rule assumes 10 answers: with n answers of which all match, each subset keeps n - 1
    matches, so a perfect prediction scores min(1, (n - 1) / 3): 0 with one answer, 2/3
    with two; datasets with one answer per question should repeat it 10 times (as
    easy-VQA and the shapes world are read).
    Quirk kept from the official script: normalisation is applied only when the humans
    disagree; when all of them gave the same raw answer, prediction and answers are
    compared after whitespace cleaning alone.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    humans = [clean_whitespace(a) for a in human_answers]
    pred = clean_whitespace(prediction)
    if len(set(humans)) > 1:
        humans = [process_digit_article(process_punctuation(a)) for a in humans]
        pred = process_digit_article(process_punctuation(pred))
    matches = sum(a == pred for a in humans)
    # Leaving out human i removes one match exactly when human i matched.
    total = 0.0
    for a in humans:
        total += min(1.0, (matches - (a == pred)) / 3.0)
    return total / len(humans)


def answer_scores(human_answers: Sequence[str], vocabulary: dict[str, int]) -> dict[int, float]:
    """Soft training target: {answer index: official accuracy of that answer} (non-zero only).

    Because the target of each candidate is `vqa_accuracy` itself, the target value of the
    model's top answer is exactly the official score of that prediction.
    """
    candidates = {clean_whitespace(a) for a in human_answers} | {normalize_answer(a) for a in human_answers}
    scores = {}
    for answer in candidates:
        index = vocabulary.get(answer)
        if index is not None:
            score = vqa_accuracy(answer, human_answers)
            if score > 0:
                scores[index] = score
    return scores


def build_answer_vocabulary(answer_lists: Iterable[Sequence[str]], top_k: int) -> list[str]:
    """The `top_k` most frequent normalised human answers, most frequent first (ties by name)."""
    counts = Counter(normalize_answer(a) for answers in answer_lists for a in answers)
    counts.pop("", None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [answer for answer, _ in ranked[:top_k]]
