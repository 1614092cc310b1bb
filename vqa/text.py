"""QuestionTokenizer: a SentencePiece model trained on the training questions.

Case is folded by SentencePiece's `nmt_nfkc_cf` normaliser, and byte fallback turns
any character it never saw (emoji, other scripts) into byte pieces, so every string
tokenizes. The model file is stored inside each checkpoint.
"""

import io
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
import torch

from .errors import CheckpointError, DataError

TOKENIZER_FILE = "tokenizer.model"
PAD_ID = 0


class QuestionTokenizer:
    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(cls, questions: Iterable[str], vocab_size: int = 4000) -> "QuestionTokenizer":
        """Train on `questions`; DataError when there are none, or `vocab_size` is below what they need."""
        buffer = io.BytesIO()
        non_blank = 0

        def counted(texts):
            nonlocal non_blank
            for text in texts:
                non_blank += bool(text.strip())
                yield text

        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=counted(questions),
                model_writer=buffer,
                vocab_size=vocab_size,
                hard_vocab_limit=False,  # a small corpus (easy-VQA) yields fewer pieces
                model_type="bpe",
                normalization_rule_name="nmt_nfkc_cf",  # NFKC + case folding
                byte_fallback=True,
                character_coverage=1.0,
                pad_id=PAD_ID, unk_id=1, bos_id=-1, eos_id=-1,
                num_threads=1,  # deterministic pieces for a given corpus
                minloglevel=2,
            )
        except RuntimeError as error:
            raise _training_error(error, vocab_size, non_blank) from None
        return cls(buffer.getvalue())

    @classmethod
    def load(cls, folder: str | Path) -> "QuestionTokenizer":
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"tokenizer file missing: {path}")
        data = path.read_bytes()
        if not data:
            raise CheckpointError(f"tokenizer file is empty (0 bytes): {path}")
        try:
            tokenizer = cls(data)
        except RuntimeError as error:
            raise CheckpointError(f"tokenizer file is not a SentencePiece model: {path} ({error})") from error
        # Some bytes parse as a model with no pieces, which then fails on every question.
        if len(tokenizer) <= PAD_ID or tokenizer.sp.id_to_piece(PAD_ID) != "<pad>":
            raise CheckpointError(f"tokenizer file {path} has {len(tokenizer)} pieces and no <pad> piece at id "
                                  f"{PAD_ID}: it was not written by QuestionTokenizer")
        return tokenizer

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        path.write_bytes(self.model_proto)
        return path

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, question: str, max_tokens: int) -> list[int]:
        """Piece ids, truncated to `max_tokens`; never empty (an empty question is one pad)."""
        ids = self.sp.encode(question)[:max_tokens]
        return ids or [PAD_ID]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i != PAD_ID])

    def pieces(self, question: str) -> list[str]:
        return self.sp.encode(question, out_type=str)


def _training_error(error: RuntimeError, vocab_size: int, questions: int) -> DataError:
    """SentencePiece's RuntimeError (a C++ assertion) as a DataError that says what to change."""
    if questions == 0:
        return DataError("no questions to train the tokenizer on (the corpus is empty or blank)")
    # e.g. "Vocabulary size is smaller than required_chars. 100 vs 281.": the smallest that works is 281
    # (every distinct character, 256 byte-fallback pieces, <pad> and <unk>), measured on easy-VQA.
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error))
    if needed:
        return DataError(f"tokenizer vocabulary size {vocab_size} is too small for these questions: "
                         f"they need at least {needed.group(1)} pieces (their distinct characters, "
                         f"256 byte pieces, <pad> and <unk>)")
    return DataError(f"SentencePiece could not train the tokenizer on {questions} questions: {error}")


def pad_questions(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) zero-padded ids and (B,) lengths."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids = torch.zeros(len(sequences), int(lengths.max()) if sequences else 0, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, lengths
