import io

import pytest
import sentencepiece as spm

from vqa.errors import CheckpointError, DataError
from vqa.text import PAD_ID, QuestionTokenizer, pad_questions

QUESTIONS = ["What color is the shape?", "Is there a red circle?", "Does the image contain a triangle?"] * 20


def test_round_trip_lower_cases(easy_vqa_tokenizer):
    ids = easy_vqa_tokenizer.encode("What COLOR is the shape?", max_tokens=32)
    assert easy_vqa_tokenizer.decode(ids) == "what color is the shape?"
    # Known words are whole pieces, not characters.
    assert easy_vqa_tokenizer.pieces("what color is the shape?") == ["▁what", "▁color", "▁is", "▁the", "▁shape", "?"]


def test_any_text_tokenizes(easy_vqa_tokenizer):
    for text in ["is there a 🐱?", "ñandú über straße", "crcle tringle", "日本語の質問", "\x00\t\n", "?" * 5]:
        ids = easy_vqa_tokenizer.encode(text, max_tokens=64)
        assert ids and all(0 <= i < len(easy_vqa_tokenizer) for i in ids)
    # Byte fallback keeps unseen characters instead of mapping them to <unk>.
    assert easy_vqa_tokenizer.decode(easy_vqa_tokenizer.encode("🐱", 64)) == "🐱"


def test_long_and_empty_questions(easy_vqa_tokenizer):
    assert len(easy_vqa_tokenizer.encode("what " * 1000, max_tokens=32)) == 32
    assert easy_vqa_tokenizer.encode("", max_tokens=32) == [PAD_ID]


def test_save_load_gives_same_ids(tmp_path, easy_vqa_tokenizer):
    easy_vqa_tokenizer.save(tmp_path)
    loaded = QuestionTokenizer.load(tmp_path)
    question = "does the image not contain a teal triangle?"
    assert loaded.encode(question, 32) == easy_vqa_tokenizer.encode(question, 32)
    assert len(loaded) == len(easy_vqa_tokenizer)


def test_pad_questions():
    ids, lengths = pad_questions([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert lengths.tolist() == [3, 1]


def test_too_small_a_vocabulary_names_the_smallest_that_works():
    with pytest.raises(DataError, match=r"vocabulary size 100 is too small .* at least (\d+) pieces") as caught:
        QuestionTokenizer.train(QUESTIONS, vocab_size=100)
    smallest = int(caught.value.args[0].split("at least ")[1].split()[0])
    # 256 byte pieces, <pad>, <unk>, and each distinct character after case folding (space becomes "▁").
    assert smallest == 256 + 2 + len(set("".join(QUESTIONS).lower()))
    assert len(QuestionTokenizer.train(QUESTIONS, vocab_size=smallest)) == smallest
    with pytest.raises(DataError, match=f"at least {smallest} pieces"):
        QuestionTokenizer.train(QUESTIONS, vocab_size=smallest - 1)


@pytest.mark.parametrize("questions", [[], ["", "   "]])
def test_no_questions_is_a_data_error(questions):
    with pytest.raises(DataError, match="no questions to train the tokenizer on"):
        QuestionTokenizer.train(iter(questions), vocab_size=300)


def other_sentencepiece_model() -> bytes:
    """A valid SentencePiece model with the library's default ids: <unk> at 0, no <pad>."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(QUESTIONS), model_writer=buffer, vocab_size=40,
                                   hard_vocab_limit=False, minloglevel=2)
    return buffer.getvalue()


@pytest.mark.parametrize("make, problem", [
    (lambda: b"", "tokenizer file is empty"),
    (lambda: b"\x00" * 10, "tokenizer file is not a SentencePiece model"),
    (lambda: b"not a model", "tokenizer file is not a SentencePiece model"),
    (other_sentencepiece_model, "no <pad> piece at id 0"),
])
def test_empty_or_invalid_tokenizer_file_is_refused(tmp_path, make, problem):
    (tmp_path / "tokenizer.model").write_bytes(make())
    with pytest.raises(CheckpointError, match=problem) as caught:
        QuestionTokenizer.load(tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(caught.value)
