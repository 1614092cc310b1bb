"""vqa/reliability/words.py: the word vocabulary of the training questions."""

import json

import pytest

from vqa.errors import CheckpointError
from vqa.reliability.words import WORDS_FILE, WordVocabulary, question_words


@pytest.mark.parametrize("text, words", [
    ("What colour is the T-shirt?", ["what", "colour", "is", "the", "t", "shirt"]),
    ("Is the DOG  on the sofa... or the dog's bed?!", ["is", "the", "dog", "on", "sofa", "or", "dog's", "bed"]),
    ("Don\u2019t o'clock 'twas the dogs' \"bowls\"", ["don't", "o'clock", "twas", "the", "dogs", "bowls"]),
    ("How many 2-liter bottles? 3.5", ["how", "many", "2", "liter", "bottles", "3", "5"]),
    ("x_y a--b ''", ["x", "y", "a", "b"]),
    ("", []),
    ("?!", []),
])
def test_question_words(text, words):
    assert question_words(text) == words


def test_unicode_is_folded_to_one_spelling():
    # Composed, decomposed (e + combining acute), full-width and upper case: one word.
    assert question_words("café Cafe\u0301 \uff23\uff21\uff26\u00c9 CAFÉ") == ["café"]
    assert question_words("Straße STRASSE") == ["strasse"]  # case folding, as the tokenizer's nmt_nfkc_cf
    # Devanagari vowel signs and virama are marks: they stay inside their word.
    assert question_words("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]
    assert question_words("東京タワーは？") == ["東京タワーは"]
    assert question_words("naïve don´t") == ["naïve", "don't"]


def test_question_words_wants_text():
    with pytest.raises(TypeError, match="text"):
        question_words(None)


@pytest.fixture
def vocabulary():
    return WordVocabulary.from_questions(["Is there a cup?", "What is in the kitchen?", "is it red, is it?"])


def test_counts_are_questions_using_the_word(vocabulary):
    assert vocabulary.count("is") == 3  # twice in the third question: counted once there
    assert vocabulary.count("it") == 1 and vocabulary.count("cups") == 0
    assert len(vocabulary) == 10 and "kitchen" in vocabulary and vocabulary.questions == 3


def test_unknown_words_in_order(vocabulary):
    assert vocabulary.unknown("Are there CUPS in the Kitchen, cups or mugs?") == ["are", "cups", "or", "mugs"]
    assert vocabulary.unknown("Is it red?") == []


def test_save_load_round_trip(vocabulary, tmp_path):
    vocabulary.counts["café"] = 1
    path = vocabulary.save(tmp_path)
    assert path == tmp_path / WORDS_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["version"] == 1 and data["questions"] == 3
    assert [w for w, _ in data["words"]] == sorted(vocabulary.counts)
    assert "café" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    loaded = WordVocabulary.load(tmp_path)
    assert loaded.counts == vocabulary.counts and loaded.questions == 3
    assert loaded.unknown("a café in the kitchen?") == vocabulary.unknown("a café in the kitchen?") == []


def test_load_absent_is_none(tmp_path):
    assert WordVocabulary.load(tmp_path) is None


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b'{"version": 1, "words": [', "not valid JSON"),
    (b'["cup", "kitchen"]', "expected an object"),
    (b'{"version": 2, "questions": 1, "words": []}', "version 2"),
    (b'{"version": 1, "questions": -1, "words": []}', "'questions'"),
    (b'{"version": 1, "questions": 3, "words": [["cup"]]}', r"words\[0\]"),
    (b'{"version": 1, "questions": 3, "words": [["cup", 4]]}', "outside 1..3"),
    (b'{"version": 1, "questions": 3, "words": [["cup", 1], ["cup", 2]]}', "twice"),
    (b'{"version": 1, "questions": 3, "words": [["Cup", 1]]}', "not one folded word"),
    (b'{"version": 1, "questions": 3, "words": [["t-shirt", 1]]}', "not one folded word"),
])
def test_bad_files_are_named(tmp_path, content, message):
    (tmp_path / WORDS_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as caught:
        WordVocabulary.load(tmp_path)
    assert str(tmp_path / WORDS_FILE) in str(caught.value)
