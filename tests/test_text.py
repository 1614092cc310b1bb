from vqa.text import PAD_ID, QuestionTokenizer, pad_questions


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
