"""VQA v2 as published in parquet on the Hugging Face Hub, converted once to the VQA v2 files.

    files = parquet_to_vqa_files("lmms-lab/VQAv2", "data/hf/validation", split="validation")
    split = load_vqa_split(files["questions"], files["annotations"], files["images"])

The source is a .parquet file, a folder of them (searched recursively), or a Hub dataset name,
fetched with huggingface_hub.snapshot_download (only its *.parquet files of the split), which uses
the local cache and, with HF_HUB_OFFLINE=1, nothing else.

The schema read is the `datasets` export of the VQA v2 features that HuggingFaceM4/VQAv2's loading
script (VQAv2.py) defines and lmms-lab/VQAv2 publishes in parquet (its README's dataset_info):

    question_id int64, question string, image_id int64,
    image struct<bytes: binary, path: string>             (a `datasets` Image)
    question_type string, answer_type string, multiple_choice_answer string,
    answers list<struct<answer: string, answer_confidence: string, answer_id: int64>>

The four annotation columns may be absent (lmms-lab/VQAv2_TOY: questions and images only) or null
in every row (the test and testdev splits, as VQAv2.py writes them): then no annotations file is
written. Files are named by split as the Hub names them, `data/validation-00000-of-00068.parquet`
(or `.../validation/0000.parquet`); "val" and "validation", "testdev", "test-dev" and "test_dev"
name the same split. Other VQA parquet layouts are refused with the file and the missing column:
Graphcore/vqa (LXMERT's `label` scores, an image path for image_id, no images, no 10 answers),
ReplugLens/VQAv2 and Multimodal-Fatima's samples (`id_image`, answers as bare strings),
merve/vqav2-small (no ids).

The output, in OUT (written in a hidden sibling folder, then renamed; a finished OUT of the same
files is left as it is):
    OUT/{split}_questions.json      {"questions": [{"image_id", "question", "question_id"}]}
    OUT/{split}_annotations.json    {"annotations": [{"question_type", "multiple_choice_answer",
                                     "answers": [{"answer", "answer_confidence", "answer_id"}],
                                     "image_id", "answer_type", "question_id"}]}
    OUT/images/{image_id}.jpg       the stored bytes, once per image (.png for PNG bytes)
    OUT/conversion.json             which files were converted, and the counts
Images are written as stored, not decoded: the project's image reader applies its own bad-image
policy when it reads them.
"""

import json
import os
import re
from pathlib import Path

from tqdm.auto import tqdm

from .errors import DataError
from .files import atomic_folder, cache_home
from .records import load_vqa_split

QUESTION_COLUMNS = ("question_id", "question", "image_id", "image")
ANNOTATION_COLUMNS = ("question_type", "multiple_choice_answer", "answers", "answer_type")
ANSWER_FIELDS = ("answer", "answer_confidence", "answer_id")
CONVERSION = "conversion.json"
_SYNONYMS = ({"val", "validation"}, {"testdev", "test-dev", "test_dev"})
# The Hub's shard names: "validation-00000-of-00068.parquet", "test-00058-of-00141-6edccf94719c69a2.parquet".
_SHARD = re.compile(r"^(\w+?)-\d{5}-of-\d{5}")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def same_split(a: str, b: str) -> bool:
    return a == b or any(a in names and b in names for names in _SYNONYMS)


def split_of(path: Path, root: Path) -> str | None:
    """The split a parquet file holds, by the Hub's naming: its shard name, its own name, or its folder."""
    match = _SHARD.match(path.name)
    if match:
        return match.group(1)
    if not path.stem.isdigit():
        return path.stem
    parent = path.parent
    return parent.name if parent != root and parent.name else None


def parquet_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(root.rglob("*.parquet"))


def select_split(files: list[Path], root: Path, split: str | None, source) -> tuple[str, list[Path]]:
    """(the split's name, its files). Without `split`, the files must hold one split."""
    splits = {f: split_of(f, root) for f in files}
    found = sorted({s for s in splits.values() if s})
    if split is None:
        if len(found) > 1:
            raise DataError(f"{source} holds several splits ({', '.join(found)}): choose one")
        return (found[0] if found else "vqa_v2"), files
    chosen = [f for f, s in splits.items() if s and same_split(s, split)]
    if not chosen:
        raise DataError(f"{source} has no .parquet files of split {split!r} (its splits: {', '.join(found) or 'none'})")
    return splits[chosen[0]], chosen  # the files' own name for it: "val" finds and names "validation"


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_snapshot(repo_id: str, split: str | None, cache_dir: str | Path | None = None) -> Path:
    """The local folder of the dataset's .parquet files (of `split`), from the cache or the Hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    names = next((n for n in _SYNONYMS if split in n), {split}) if split else set()
    patterns = [p for n in sorted(names) for p in (f"*{n}-*.parquet", f"*{n}.parquet", f"*/{n}/*.parquet")]
    offline = _offline()
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns or ["*.parquet"],
                                   cache_dir=cache_dir, local_files_only=offline)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        raise DataError(f"dataset {repo_id} is not in the Hugging Face cache and {why}: download it once online "
                        f"(or pass a local folder of its .parquet files)") from error
    except RepositoryNotFoundError as error:
        raise DataError(f"no dataset {repo_id} on the Hugging Face Hub (or it is private or gated: "
                        f"log in with `hf auth login`)") from error
    except (HfHubHTTPError, IncompleteSnapshotError) as error:
        raise DataError(f"dataset {repo_id}: {str(error).splitlines()[0]}") from error
    return Path(folder)


def resolve_source(source: str | Path, split: str | None, cache_dir=None) -> Path:
    path = Path(source)
    if path.exists():
        return path
    text = str(source)
    if _REPO_ID.fullmatch(text) and not text.endswith(".parquet") and not text.startswith("."):
        return hub_snapshot(text, split, cache_dir)
    raise DataError(f"parquet source not found: {source} (a .parquet file, a folder, or a Hub name like "
                    f"lmms-lab/VQAv2)")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as error:
        raise DataError("reading parquet needs pyarrow: pip install pyarrow") from error
    return pyarrow, pyarrow.parquet


def check_schema(path: Path) -> bool:
    """Whether the file has the annotation columns; DataError naming the file and a missing or mistyped column."""
    pa, pq = _pyarrow()

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path} is not a readable parquet file ({error})") from error
    for column in QUESTION_COLUMNS:
        if column not in schema.names:
            raise DataError(f"{path} has no column {column!r} (columns: {', '.join(schema.names)}); "
                            f"expected the VQA v2 schema of lmms-lab/VQAv2")
    image = schema.field("image").type
    if not pa.types.is_struct(image) or not {"bytes", "path"} & {image.field(i).name for i in range(image.num_fields)}:
        raise DataError(f"{path}: column 'image' is {image}, expected a struct with 'bytes' and 'path' "
                        f"(a `datasets` Image)")
    present = [c for c in ANNOTATION_COLUMNS if c in schema.names]
    if not present:
        return False
    missing = [c for c in ANNOTATION_COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"{path} has no column {missing[0]!r} (it has {', '.join(present)}: the annotation "
                        f"columns come all together or not at all)")
    answers = schema.field("answers").type
    item = answers.value_type if pa.types.is_list(answers) or pa.types.is_large_list(answers) else None
    fields = {item.field(i).name for i in range(item.num_fields)} if item is not None and pa.types.is_struct(item) \
        else set()
    if not set(ANSWER_FIELDS) <= fields:
        raise DataError(f"{path}: column 'answers' is {answers}, expected a list of "
                        f"{{answer, answer_confidence, answer_id}} (the official VQA v2 answers)")
    return True


def _image_suffix(data: bytes, path: str | None) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    suffix = Path(path or "").suffix.lower()
    # Other bytes keep .jpg: the project's reader opens images by their content, and judges them.
    return suffix if suffix in (".jpg", ".jpeg", ".png") else ".jpg"


def _image_bytes(image, parquet: Path, row: int, question_id) -> tuple[bytes, str | None]:
    image = image or {}
    data, path = image.get("bytes"), image.get("path")
    if data:
        return data, path
    if path:
        file = Path(path) if Path(path).is_absolute() else parquet.parent / path
        try:
            return file.read_bytes(), path
        except OSError:
            pass
    raise DataError(f"{parquet}: row {row} (question_id {question_id}) has an image with neither bytes nor a "
                    f"readable file (path {path!r})")


def _require(value, kind, parquet: Path, row: int, column: str):
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{parquet}: row {row} column {column!r} is {value!r}, expected {kind.__name__}")
    return value


def _annotation(row: dict, parquet: Path, i: int) -> dict:
    answers = []
    for answer in _require(row["answers"], list, parquet, i, "answers"):
        answers.append({"answer": _require(answer.get("answer"), str, parquet, i, "answers.answer"),
                        "answer_confidence": _require(answer.get("answer_confidence"), str, parquet, i,
                                                      "answers.answer_confidence"),
                        "answer_id": _require(answer.get("answer_id"), int, parquet, i, "answers.answer_id")})
    return {"question_type": _require(row["question_type"], str, parquet, i, "question_type"),
            "multiple_choice_answer": _require(row["multiple_choice_answer"], str, parquet, i,
                                               "multiple_choice_answer"),
            "answers": answers,
            "image_id": row["image_id"],
            "answer_type": _require(row["answer_type"], str, parquet, i, "answer_type"),
            "question_id": row["question_id"]}


def _outputs(out_dir: Path, name: str, annotated: bool) -> dict:
    return {"questions": out_dir / f"{name}_questions.json",
            "annotations": out_dir / f"{name}_annotations.json" if annotated else None,
            "images": out_dir / "images"}


def parquet_to_vqa_files(source: str | Path, out_dir: str | Path, split: str | None = None, progress: bool = True,
                         cache_dir: str | Path | None = None) -> dict:
    """Convert the VQA v2 parquet `source` (of `split`) into OUT; returns dict(questions=, annotations=, images=).

    `annotations` is None for a split without answers. Skipped when OUT already holds the
    conversion of the same files (names and sizes); another OUT is refused, never overwritten.
    """
    _, pq = _pyarrow()
    out_dir = Path(out_dir)
    root = resolve_source(source, split, cache_dir)
    files = parquet_files(root)
    if not files:
        raise DataError(f"{root} holds no .parquet files")
    name, files = select_split(files, root, split, source)
    identity = [{"file": f.relative_to(root).as_posix() if f != root else f.name, "size": f.stat().st_size}
                for f in files]

    done = out_dir / CONVERSION
    if done.is_file():
        record = json.loads(done.read_text(encoding="utf-8"))
        outputs = _outputs(out_dir, record["split"], record["annotations"])
        if record["files"] == identity and record["split"] == name and all(
                p is None or p.exists() for p in outputs.values()):
            return outputs
        raise DataError(f"{out_dir} holds the conversion of other files ({record['source']}, split "
                        f"{record['split']}): remove it or choose another folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not a finished conversion: remove it or choose another folder")

    annotated = [check_schema(f) for f in files]
    with atomic_folder(out_dir) as staging:  # an empty out_dir (checked above) is replaced
        (staging / "images").mkdir()
        questions, annotations, images = _convert(files, annotated, staging / "images", progress, pq)
        outputs = _outputs(staging, name, bool(annotations))
        header = {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": name}
        outputs["questions"].write_text(json.dumps({**header, "questions": questions}), encoding="utf-8")
        if annotations:
            outputs["annotations"].write_text(json.dumps({**header, "annotations": annotations}), encoding="utf-8")
        (staging / CONVERSION).write_text(json.dumps(
            {"source": str(source), "split": name, "files": identity, "annotations": bool(annotations),
             "questions": len(questions), "images": images}, indent=2) + "\n", encoding="utf-8")
    return _outputs(out_dir, name, bool(annotations))


def _convert(files: list[Path], annotated: list[bool], image_dir: Path, progress: bool, pq):
    questions, annotations, seen_images, seen_questions = [], [], set(), set()
    answered_rows = None  # whether rows carry answers: the first row decides, the others must agree
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    with tqdm(total=total, desc="converting parquet", unit="q", disable=not progress) as bar:
        for parquet, has_columns in zip(files, annotated):
            columns = list(QUESTION_COLUMNS) + (list(ANNOTATION_COLUMNS) if has_columns else [])
            i = 0
            for batch in pq.ParquetFile(parquet).iter_batches(batch_size=64, columns=columns):
                for row in batch.to_pylist():
                    question_id = _require(row["question_id"], int, parquet, i, "question_id")
                    image_id = _require(row["image_id"], int, parquet, i, "image_id")
                    if question_id in seen_questions:
                        raise DataError(f"{parquet}: row {i} repeats question_id {question_id}")
                    seen_questions.add(question_id)
                    questions.append({"image_id": image_id,
                                      "question": _require(row["question"], str, parquet, i, "question"),
                                      "question_id": question_id})
                    answered = has_columns and row["answers"] is not None
                    if answered_rows is None:
                        answered_rows = answered
                    elif answered != answered_rows:
                        raise DataError(f"{parquet}: row {i} (question_id {question_id}) "
                                        f"{'has' if answered else 'has no'} answers, unlike the rows before it")
                    if answered:
                        annotations.append(_annotation(row, parquet, i))
                    if image_id not in seen_images:
                        data, path = _image_bytes(row["image"], parquet, i, question_id)
                        (image_dir / f"{image_id}{_image_suffix(data, path)}").write_bytes(data)
                        seen_images.add(image_id)
                    i += 1
                bar.update(batch.num_rows)
    return questions, annotations, len(seen_images)


def hf_cache_folder(source: str | Path, split: str | None) -> Path:
    """Where `load_hf_split` converts a source: $VQA_CACHE_DIR/hf (else ~/.cache/vqa-demo/hf), one
    folder per source and split, named from them."""
    root = cache_home() / "hf"
    name = re.sub(r"[^\w.-]+", "_", str(Path(source).expanduser().resolve()) if Path(source).exists() else str(source))
    return root / f"{name.strip('_')[-80:]}-{split or 'all'}"


def load_hf_split(source: str | Path, split: str | None = None, out_dir: str | Path | None = None,
                  allow_nonstandard_answers: bool = False, progress: bool = True):
    """A VQA v2 parquet source (file, folder or Hub name) as a VQASplit: converted once (into
    `out_dir`, default `hf_cache_folder`), then read by the one VQA v2 reader."""
    files = parquet_to_vqa_files(source, out_dir or hf_cache_folder(source, split), split=split, progress=progress)
    return load_vqa_split(files["questions"], files["annotations"], files["images"],
                          allow_nonstandard_answers=allow_nonstandard_answers, name=f"hf-{split or 'all'}")
