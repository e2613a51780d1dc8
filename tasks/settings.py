"""Where the built-in tasks find their files: environment variables, with defaults next to the repository.

    T5X_LITE_DATA_DIR          the local data folder (cbqa/, corpus/, vocab/); default ../shared/data from the
                               repository root when that folder exists. Set to "" for none: the closed-book QA
                               tasks then read TFDS (which finds its data through TFDS_DATA_DIR, as always).
    T5X_LITE_SPM_PATH          T5's SentencePiece model; default <data dir>/vocab/t5_cc_all_32000.spiece.model,
                               else T5's own copy on GCS
    T5X_LITE_CORPUS            comma-separated file patterns of the local pre-training corpus; default the
                               Gutenberg books, State of the Union addresses and WikiText-2 under <data dir>/corpus
    T5X_LITE_SKIP_BAD_RECORDS  "1": the closed-book QA tasks skip malformed records (counting them and logging the
                               count) instead of stopping at the first

They are read when `tasks` is imported, which registers the tasks with them: set them before.
"""
import os
from pathlib import Path

import seqio

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
T5_SPM_FILE = "vocab/t5_cc_all_32000.spiece.model"
T5_SPM_GCS_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
CORPUS_FILES = ("corpus/gutenberg/*.txt", "corpus/sotu/*.txt", "corpus/wikitext2/wiki.*.raw")


def data_dir() -> str | None:
    """The local data folder: T5X_LITE_DATA_DIR if set ("" for none), else ../shared/data when it exists."""
    configured = os.environ.get("T5X_LITE_DATA_DIR")
    if configured is not None:
        return configured or None
    return str(DEFAULT_DATA_DIR) if DEFAULT_DATA_DIR.is_dir() else None


def t5_spm_path() -> str:
    """T5's SentencePiece model (32,000 pieces; the tasks add 100 extra ids)."""
    configured = os.environ.get("T5X_LITE_SPM_PATH")
    if configured:
        return configured
    local = data_dir()
    return os.path.join(local, T5_SPM_FILE) if local else T5_SPM_GCS_PATH


def t5_vocabulary() -> seqio.SentencePieceVocabulary:
    """T5's SentencePiece vocabulary with 100 extra ids (32,100 ids; `<extra_id_0>` = 32099) from t5_spm_path().
    seqio loads the model when it is first used, so building this needs no file."""
    return seqio.SentencePieceVocabulary(t5_spm_path(), extra_ids=100)


def corpus_patterns() -> list[str]:
    """File patterns of the local pre-training corpus (under the default data folder when none is set, so that
    reading the task says which files it looked for)."""
    configured = os.environ.get("T5X_LITE_CORPUS")
    if configured:
        return [pattern.strip() for pattern in configured.split(",") if pattern.strip()]
    root = data_dir() or str(DEFAULT_DATA_DIR)
    return [os.path.join(root, pattern) for pattern in CORPUS_FILES]


def skip_bad_records() -> bool:
    """Whether the closed-book QA tasks skip (and count) malformed records rather than stop at the first."""
    value = os.environ.get("T5X_LITE_SKIP_BAD_RECORDS", "").strip().lower()
    if value not in ("", "0", "1", "false", "true"):
        raise ValueError(f"T5X_LITE_SKIP_BAD_RECORDS={value!r}; valid: 0, 1, false, true.")
    return value in ("1", "true")
