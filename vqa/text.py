"""QuestionTokenizer: a SentencePiece model trained on the training questions.

Case is folded by SentencePiece's `nmt_nfkc_cf` normaliser, and byte fallback turns
any character it never saw (emoji, other scripts) into byte pieces, so every string
tokenizes. The model file is stored inside each checkpoint.
"""

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
import torch

from .errors import CheckpointError

TOKENIZER_FILE = "tokenizer.model"
PAD_ID = 0


class QuestionTokenizer:
    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(cls, questions: Iterable[str], vocab_size: int = 4000) -> "QuestionTokenizer":
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(questions),
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
        return cls(buffer.getvalue())

    @classmethod
    def load(cls, folder: str | Path) -> "QuestionTokenizer":
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"tokenizer file missing: {path}")
        try:
            return cls(path.read_bytes())
        except RuntimeError as error:
            raise CheckpointError(f"tokenizer file is corrupt: {path} ({error})") from error

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


def pad_questions(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) zero-padded ids and (B,) lengths."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids = torch.zeros(len(sequences), int(lengths.max()) if sequences else 0, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, lengths
