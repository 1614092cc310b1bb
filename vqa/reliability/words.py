"""The words of the training questions, to say which words of a new question the model never saw.

    vocabulary = WordVocabulary.from_questions(training_questions)
    vocabulary.unknown("Are there cups in the kitchen?")   # ['cups', 'kitchen'] if never seen
    vocabulary.save(checkpoint_folder)                     # words.json

A word is a run of Unicode letters, digits and combining marks, with apostrophes kept
inside it ("don't", "o'clock") and all other punctuation splitting or dropped ("t-shirt"
-> "t", "shirt"). Text is NFKC-normalised and case-folded first: the same folding as the
question tokenizer's `nmt_nfkc_cf` rule, so "Ｃａｆé", "CAFÉ" and "café" are one word.
"""

import json
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable

from ..errors import CheckpointError
from ..files import atomic_write_text

WORDS_FILE = "words.json"
VERSION = 1
# Apostrophe look-alikes typed by phones and word processors, read as "'".
APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'", "`": "'"})


def _starts_word(char: str) -> bool:
    return char.isalnum()


def _continues_word(char: str) -> bool:
    # Marks (accents, vowel signs, viramas) belong to the letter before them: Devanagari
    # and other scripts spell most words with them, and NFKC composes only some.
    return char.isalnum() or unicodedata.category(char).startswith("M")


def question_words(text: str) -> list[str]:
    """The distinct words of `text`, folded (see the module docstring), in order of first use."""
    if not isinstance(text, str):
        raise TypeError(f"question_words expects text, got {type(text).__name__}")
    # Apostrophes first: NFKC would turn the acute accent U+00B4 into a space and a mark.
    text = unicodedata.normalize("NFKC", text.translate(APOSTROPHES)).casefold()
    words, current = {}, []
    for i, char in enumerate(text):
        if _continues_word(char) if current else _starts_word(char):
            current.append(char)
        elif char == "'" and current and i + 1 < len(text) and _starts_word(text[i + 1]):
            current.append(char)  # inside a word: "don't"; at either end it is a quote mark
        elif current:
            words.setdefault("".join(current))
            current = []
    if current:
        words.setdefault("".join(current))
    return list(words)


class WordVocabulary:
    """Words of the training questions, each with the number of training questions using it."""

    def __init__(self, counts: dict[str, int], questions: int = 0):
        self.counts = dict(counts)
        self.questions = questions

    @classmethod
    def from_questions(cls, questions: Iterable[str]) -> "WordVocabulary":
        counts, total = Counter(), 0
        for position, question in enumerate(questions):
            if not isinstance(question, str):
                raise TypeError(f"question {position} is {type(question).__name__}, expected text")
            counts.update(question_words(question))
            total += 1
        return cls(counts, total)

    def __len__(self) -> int:
        return len(self.counts)

    def __contains__(self, word: str) -> bool:
        return word in self.counts

    def count(self, word: str) -> int:
        """How many training questions use `word` (already folded); 0 when none."""
        return self.counts.get(word, 0)

    def unknown(self, question: str) -> list[str]:
        """The words of `question` that no training question uses, in the question's order."""
        return [w for w in question_words(question) if w not in self.counts]

    def save(self, folder: str | Path) -> Path:
        """Write words.json: {"version", "questions", "words": [[word, questions using it], ...]} by word."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # One [word, count] per line: a person can read and diff the file.
        lines = ",\n".join("  " + json.dumps([w, self.counts[w]], ensure_ascii=False) for w in sorted(self.counts))
        return atomic_write_text(folder / WORDS_FILE,
                                 f'{{"version": {VERSION}, "questions": {self.questions}, "words": [\n{lines}\n]}}\n')

    @classmethod
    def load(cls, folder: str | Path) -> "WordVocabulary | None":
        """The vocabulary in `folder`/words.json; None when the file is absent; CheckpointError
        naming the file when it is not UTF-8, not JSON, or not of the layout `save` writes."""
        path = Path(folder) / WORDS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as error:
            raise CheckpointError(f"word list is not UTF-8 text: {path} ({error})") from error
        except json.JSONDecodeError as error:
            raise CheckpointError(f"word list is not valid JSON: {path} ({error})") from error
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise CheckpointError(f"{path}: expected an object with a list 'words', as WordVocabulary.save writes")
        if data.get("version") != VERSION:
            raise CheckpointError(f"{path}: version {data.get('version')!r} is not supported "
                                  f"(this code reads {VERSION})")
        questions = data.get("questions")
        if not isinstance(questions, int) or isinstance(questions, bool) or questions < 0:
            raise CheckpointError(f"{path}: 'questions' is {questions!r}, expected a count >= 0")
        counts = {}
        for position, entry in enumerate(data["words"]):
            where = f"{path}: words[{position}]"
            if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                    or not isinstance(entry[1], int) or isinstance(entry[1], bool)):
                raise CheckpointError(f"{where} is {entry!r}, expected [word, count]")
            word, count = entry
            if not 1 <= count <= questions:
                raise CheckpointError(f"{where}: count {count} is outside 1..{questions} (the questions counted)")
            if question_words(word) != [word]:
                raise CheckpointError(f"{where}: {word!r} is not one folded word (question_words gives "
                                      f"{question_words(word)!r})")
            if word in counts:
                raise CheckpointError(f"{where}: {word!r} appears twice")
            counts[word] = count
        return cls(counts, questions)
