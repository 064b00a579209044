"""tokenize stage: a raw split -> token ids for both heads, streamed batch by batch.

Memory stays flat: the raw file is read with `iter_batches` and each batch becomes one row group
of a ParquetWriter. Speed: the Rust tokenizer is called directly (the transformers wrapper
costs about as much again in Python), once per batch for the pair encodings; for the choice
head each prompt and each distinct choice is tokenized once and the (prompt, choice) encodings
are assembled with numpy following the post-processor's layout (checked against the tokenizer
at start; if it does not match, every (prompt, choice) pair goes through the tokenizer). List
columns are built from numpy offsets.

Truncation: pair encodings (task head) use `longest_first`; choice encodings truncate only the
prompt, from the left, so the choice is never cut and the question at the prompt's end survives.

Long texts: at most max_length tokens of any text survive truncation, so a text of more than
max_length words is first cut to its first (pair texts) or last (prompts) max_length words
(`clip_words`; tokenizing whole paragraphs to keep 64 of their tokens was most of the time on
MultiRC and BoolQ). The output stays byte for byte the same: a cut text's tokens are the first
(last) tokens of the whole text, and a row whose truncated encoding could still depend on how
many more tokens the whole text has (`encode_pairs`, `encode_prompts` say when) is tokenized
whole. The premise is checked on the tokenizer at start (`clip_words_agrees`): where it fails,
as for byte-level BPE, every text is tokenized whole.

Seq2seq (`max_target_length` given, the stage passes it when model.kind is seq2seq): two more
columns, `prompt_input_ids` and `target_input_ids` (`pipeline_src.models.seq2seq_collate`:
prompt truncated from the left to max_length, each choice to max_target_length, both ending
with eos), from the same rendered prompt and verbalized choices.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_src.data.download import METADATA_KEY, read_metadata
from pipeline_src.errors import PipelineError
from pipeline_src.io_utils import atomic_output
from pipeline_src.tasks.registry import TaskSpec, get_task

RAW_COLUMNS = ["task", "idx", "label", "score", "text_a", "text_b", "choices", "raw_json"]
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
)

TOKENIZED_SCHEMA = pa.schema([
    pa.field("task", pa.string(), nullable=False),
    pa.field("idx", pa.int64(), nullable=False),
    pa.field("label", pa.int64(), nullable=False),
    pa.field("score", pa.float64()),
    pa.field("pair_input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("pair_token_type_ids", pa.list_(pa.int8()), nullable=False),
    pa.field("pair_attention_mask", pa.list_(pa.int8()), nullable=False),
    pa.field("choice_input_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
    pa.field("choice_token_type_ids", pa.list_(pa.list_(pa.int8())), nullable=False),
    pa.field("choice_attention_mask", pa.list_(pa.list_(pa.int8())), nullable=False),
])


def tokenize_split(raw_path: str | os.PathLike, out_path: str | os.PathLike, tokenizer_name_or_path: str,
                   max_length: int, batch_rows: int = 2048, tokenizer_label: str | None = None,
                   max_target_length: int | None = None) -> dict[str, Any]:
    """Tokenize one raw split into the tokenized schema; return its metadata (also stored in the file).

    `tokenizer_label` is the name recorded in the metadata (default: the path it was loaded from).
    The stage passes the canonical model name, so the file's bytes, and DVC's hash of it, do not
    depend on where the tokenizer happens to be installed. `max_target_length` (seq2seq models):
    also write the seq2seq columns (SEQ2SEQ_FIELDS) after the others."""
    if max_length < 8 or batch_rows < 1:
        raise PipelineError(f"tokenize: max_length={max_length} must be >= 8 and batch_rows={batch_rows} >= 1")
    raw_path = Path(raw_path)
    raw = open_raw(raw_path)
    raw_meta = read_metadata(raw_path)
    spec = get_task(raw_meta["task"])
    tokenizer = load_fast_tokenizer(tokenizer_name_or_path)
    backends = make_backends(tokenizer, max_length)
    seq2seq = None if max_target_length is None else (tokenizer, max_target_length)
    metadata = {
        "tokenizer": tokenizer_label or tokenizer_name_or_path,
        "tokenizer_hash": tokenizer_files_hash(tokenizer_name_or_path, tokenizer),
        "max_length": max_length,
        "task": spec.name,
        "split": raw_meta.get("split"),
        "stands_in_for": raw_meta.get("stands_in_for"),
        "raw_hash": file_sha256(raw_path),
        "n_rows": raw.metadata.num_rows,
        "truncation": {"pair": "longest_first", "choice": "only_first (prompt, from the left)"},
    }
    schema = TOKENIZED_SCHEMA
    if seq2seq is not None:
        from pipeline_src.models.seq2seq_collate import SEQ2SEQ_FIELDS, seq2seq_special_ids

        pad, eos = seq2seq_special_ids(tokenizer)
        metadata["seq2seq"] = {"max_target_length": max_target_length, "pad_id": pad, "eos_id": eos,
                               "truncation": "prompt from the left, targets from the right; eos appended"}
        schema = pa.schema(list(TOKENIZED_SCHEMA) + SEQ2SEQ_FIELDS)
    schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata)})
    with atomic_output(out_path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in raw_batches(raw, raw_path, batch_rows):
                writer.write_table(tokenize_batch(batch, spec, backends, raw_path, seq2seq))
    return metadata


# ---- inputs ----

def open_raw(raw_path: Path) -> pq.ParquetFile:
    """Open the raw Parquet, refusing truncated/corrupt files and files without the raw columns."""
    if not raw_path.is_file():
        raise PipelineError(f"tokenize: missing raw file {raw_path}")
    try:
        raw = pq.ParquetFile(raw_path)
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"tokenize: {raw_path} is not a readable Parquet file (truncated or corrupt?): {e}") from None
    missing = [c for c in RAW_COLUMNS if c not in raw.schema_arrow.names]
    if missing:
        raise PipelineError(f"tokenize: {raw_path} lacks raw column(s) {missing}")
    return raw


def raw_batches(raw: pq.ParquetFile, raw_path: Path, batch_rows: int):
    """Record batches of the raw columns; a corrupt page surfaces here, named by path."""
    try:
        yield from raw.iter_batches(batch_size=batch_rows, columns=RAW_COLUMNS)
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"tokenize: {raw_path} is corrupt (failed while reading): {e}") from None


def load_fast_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer  # heavy import, only where tokenizing

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise PipelineError(f"tokenize: cannot load tokenizer {name_or_path!r}: {type(e).__name__}: {e}") from None
    if not tokenizer.is_fast:
        raise PipelineError(f"tokenize: tokenizer {name_or_path!r} has no fast (Rust) version")
    return tokenizer


@dataclass
class Backends:
    """Copies of the Rust tokenizer, each set up for one job."""

    pair: Any               # (text_a, text_b), truncation longest_first
    choice: Any             # (prompt, choice), only the prompt truncated, from the left
    plain: Any              # no truncation: prompts and choices tokenized separately
    layout: "PairLayout | None"  # set when (prompt, choice) encodings can be assembled from the pieces
    max_length: int
    clip: bool = True       # long texts are cut to max_length words first (clip_words)


def make_backends(tokenizer, max_length: int) -> Backends:
    from tokenizers import Tokenizer

    def copy(**truncation) -> Any:
        tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        tok.no_padding()
        tok.no_truncation()
        if truncation:
            tok.enable_truncation(max_length, **truncation)
        return tok

    pair, choice, plain = copy(strategy="longest_first"), copy(strategy="only_first", direction="left"), copy()
    layout = PairLayout.probe(plain, choice)
    return Backends(pair, choice, plain, layout, max_length, clip=CLIP_LONG_TEXTS and clip_words_agrees(plain))


# ---- hashes ----

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_files_hash(name_or_path: str, tokenizer) -> str:
    """sha256 over the tokenizer's files: the folder's own files, or what the loaded tokenizer saves."""
    folder = Path(name_or_path)
    if folder.is_dir():
        return _hash_files(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return _hash_files(Path(tmp))


def _hash_files(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + file_sha256(folder / name).encode() + b"\n")
    return digest.hexdigest()


# ---- one batch ----

def tokenize_batch(batch: pa.RecordBatch, spec: TaskSpec, tok: Backends, raw_path: Path,
                   seq2seq: tuple[Any, int] | None = None) -> pa.Table:
    """One raw batch -> one row group; `seq2seq` = (HF tokenizer, max_target_length) adds its columns."""
    pair = encode_pairs(tok, batch.column("text_a").to_pylist(), batch.column("text_b").to_pylist())

    choices = batch.column("choices")
    prompts = [spec.template(json.loads(s)) for s in batch.column("raw_json").to_pylist()]
    prompts, prompt_ids = encode_prompts(tok, prompts)  # long prompts cut where that changes nothing
    n_choices = np.diff(choices.offsets.to_numpy(zero_copy_only=False)).astype(np.int32)
    flat_choices = choices.flatten().to_pylist()
    if tok.layout is not None:
        choice = tok.layout.encode_choices(tok.plain, prompt_ids, flat_choices, n_choices, tok.max_length)
    else:
        choice = encode_choices_directly(tok.choice, prompts, flat_choices, n_choices)
    if isinstance(choice, int):  # index of a (prompt, choice) pair that cannot fit max_length
        raise _too_long_choice(batch, flat_choices, n_choices, choice, tok.max_length, raw_path)

    row_offsets = np.zeros(len(prompts) + 1, dtype=np.int32)
    np.cumsum(n_choices, out=row_offsets[1:])
    columns = [batch.column("task"), batch.column("idx"), batch.column("label"), batch.column("score")]
    columns += [list_array(pair.offsets, values) for values in (pair.ids, pair.type_ids, pair.mask)]
    columns += [
        nested_list_array(row_offsets, choice.offsets, values)
        for values in (choice.ids, choice.type_ids, choice.mask)
    ]
    if seq2seq is None:
        return pa.Table.from_arrays(columns, schema=TOKENIZED_SCHEMA)
    from pipeline_src.models.seq2seq_collate import SEQ2SEQ_FIELDS, encode_seq2seq

    hf_tokenizer, max_target_length = seq2seq
    per_row = [flat_choices[row_offsets[i]:row_offsets[i + 1]] for i in range(len(prompts))]
    encoded = encode_seq2seq(hf_tokenizer, prompts, per_row, tok.max_length, max_target_length)
    columns += [encoded[field.name] for field in SEQ2SEQ_FIELDS]
    return pa.Table.from_arrays(columns, schema=pa.schema(list(TOKENIZED_SCHEMA) + SEQ2SEQ_FIELDS))


class FlatEncoding:
    """Concatenated token ids / type ids / mask of many sequences, with offsets (len n + 1)."""

    def __init__(self, offsets: np.ndarray, ids: np.ndarray, type_ids: np.ndarray):
        self.offsets, self.ids, self.type_ids = offsets, ids, type_ids
        # No padding is stored, so every stored position is attended.
        self.mask = np.ones(len(ids), dtype=np.int8)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def encode_list(backend, inputs: Sequence, add_special_tokens: bool = True) -> list:
    return backend.encode_batch(inputs, add_special_tokens=add_special_tokens) if inputs else []


def encode_flat(backend, inputs: Sequence, add_special_tokens: bool = True) -> FlatEncoding:
    return flatten(encode_list(backend, inputs, add_special_tokens))


def flatten(encodings: list) -> FlatEncoding:
    lengths = np.fromiter((len(e) for e in encodings), dtype=np.int32, count=len(encodings))
    offsets = np.zeros(len(encodings) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=total)
    type_ids = np.fromiter(
        itertools.chain.from_iterable(e.type_ids for e in encodings), dtype=np.int8, count=total
    )
    return FlatEncoding(offsets, ids, type_ids)


def encode_choices_directly(choice_tok, prompts: list[str], flat_choices: list[str],
                            n_choices: np.ndarray) -> FlatEncoding | int:
    """Fallback: one (prompt, choice) pair per choice through the truncating tokenizer."""
    flat_prompts = np.repeat(np.array(prompts, dtype=object), n_choices).tolist()
    inputs = list(zip(flat_prompts, flat_choices))
    try:
        return encode_flat(choice_tok, inputs)
    except Exception:  # Rust truncation error: find the pair that cannot fit
        for k, item in enumerate(inputs):
            try:
                choice_tok.encode(*item)
            except Exception:
                return k
        raise


# ---- long texts: cut to max_length words before tokenizing ----

# Tests and benchmarks turn this off to compare with tokenizing every text whole.
CLIP_LONG_TEXTS = True

# A word: a run of characters other than ASCII space, tab, newline and carriage return. WordPiece
# (BERT) and SentencePiece (T5) tokenizers normalize each character on its own and split at these
# four, so the words on either side of one are tokenized independently: the tokens of a text's
# first (last) n words are the first (last) tokens of the whole text. (Other Unicode spaces are
# left inside words: BERT deletes some of them, e.g. U+001C, and never splits there.)
_WORD = re.compile(r"[^ \t\n\r]+")


@functools.lru_cache(maxsize=None)
def _first_words(n: int) -> re.Pattern:
    return re.compile(r"[ \t\n\r]*(?:[^ \t\n\r]+[ \t\n\r]+){%d}[^ \t\n\r]+" % (n - 1))


def clip_words(text: str, n: int, keep: str = "start") -> str:
    """The first (keep="start") or last (keep="end") n words of `text`, cut out of the original
    string (whitespace inside kept as is); `text` itself when it has at most n words."""
    s = text if keep == "start" else text[::-1]
    m = _first_words(n).match(s)
    if m is None or _WORD.search(s, m.end()) is None:
        return text
    return text[:m.end()] if keep == "start" else text[len(text) - m.end():]


def clip_words_agrees(plain) -> bool:
    """Check clip_words's premise on this tokenizer with one probe text. Byte-level BPE (a word's
    first token depends on the space before it) fails it, and so does a normalizer that turns a
    zero-width space into a space it does not strip; those tokenizers get every text whole, and so
    do tokenizers with an added token that contains whitespace (a cut could split it)."""
    if any(_WORD.fullmatch(t.content) is None for t in plain.get_added_tokens_decoder().values()):
        return False
    text = "Hello, world!  A\ttest:\n unïcödé 東京 don't-stop \u200b 12,345.67 [SEP] ça va?\r\nEnd."
    n_words = len(_WORD.findall(text))
    heads = [clip_words(text, n, "start") for n in range(1, n_words)]
    tails = [clip_words(text, n, "end") for n in range(1, n_words)]
    full, *parts = [e.ids for e in plain.encode_batch([text] + heads + tails, add_special_tokens=False)]
    return all(ids == full[:len(ids)] for ids in parts[:len(heads)]) and \
        all(ids == full[len(full) - len(ids):] for ids in parts[len(heads):])


def encode_pairs(tok: Backends, text_a: list[str], text_b: list[str | None]) -> FlatEncoding:
    """The task head's encodings of text_a (and text_b where given), truncated longest_first.

    With tok.clip, each text of more than max_length words is first cut to its first max_length
    words. longest_first keeps the first tokens of each text, how many depending only on the two
    token counts, and a cut text has at most as many tokens as the whole one. The encoding of a
    row is the same for every larger count of its cut text(s) exactly when it fills max_length and
    each cut text kept at least as many tokens as the other text (checked over all lengths against
    the truncation rule: the longer text gets the odd token, so the order of the counts matters).
    Other rows with a cut text (short of tokens, or the other text longer) are encoded whole."""
    def inputs(a: list, b: list) -> list:
        return [x if y is None else (x, y) for x, y in zip(a, b)]

    if not tok.clip:
        return encode_flat(tok.pair, inputs(text_a, text_b))
    a = [clip_words(t, tok.max_length) for t in text_a]
    b = [t if t is None else clip_words(t, tok.max_length) for t in text_b]
    encodings = encode_list(tok.pair, inputs(a, b))
    redo = [i for i, e in enumerate(encodings)
            if not _same_as_whole(e, a[i] != text_a[i], b[i] != text_b[i], tok.max_length)]
    whole = encode_list(tok.pair, inputs([text_a[i] for i in redo], [text_b[i] for i in redo]))
    for i, e in zip(redo, whole):
        encodings[i] = e
    return flatten(encodings)


def _same_as_whole(encoding, cut_a: bool, cut_b: bool, max_length: int) -> bool:
    if not (cut_a or cut_b):
        return True
    if len(encoding) < max_length:  # room left: the whole text would have filled it
        return False
    sequence_ids = encoding.sequence_ids
    kept_a, kept_b = sequence_ids.count(0), sequence_ids.count(1)
    return (not cut_a or kept_a >= kept_b) and (not cut_b or kept_b >= kept_a)


def encode_prompts(tok: Backends, prompts: list[str]) -> tuple[list[str], FlatEncoding]:
    """The prompts as the choice heads tokenize them, and their token ids (no special tokens).

    Prompts are truncated from the left, to at most max_length - 1 tokens. With tok.clip, a prompt
    of more than max_length words is cut to its last max_length words; where the cut prompt still
    has >= max_length tokens, its last max_length tokens are the whole prompt's, so every head keeps
    the same tokens. A cut prompt with fewer tokens (words that normalize to nothing, e.g.
    zero-width spaces) is replaced by the whole prompt."""
    texts = [clip_words(p, tok.max_length, keep="end") for p in prompts] if tok.clip else list(prompts)
    encodings = encode_list(tok.plain, texts, add_special_tokens=False)
    redo = [i for i, (t, p) in enumerate(zip(texts, prompts)) if t != p and len(encodings[i]) < tok.max_length]
    for i, e in zip(redo, encode_list(tok.plain, [prompts[i] for i in redo], add_special_tokens=False)):
        texts[i], encodings[i] = prompts[i], e
    return texts, flatten(encodings)


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """np.concatenate([arange(s, s + n) for s, n in zip(starts, lengths)]) without the Python loop."""
    out_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts - out_starts, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


class PairLayout:
    """How the tokenizer's post-processor lays out a pair: prefix A middle B suffix.

    Knowing it, each prompt is tokenized once per row and each distinct choice once per batch,
    and the (prompt, choice) encodings are assembled with numpy: same ids as tokenizing every
    pair, about half the tokenizer work on two-choice tasks.
    """

    def __init__(self, pieces: list[tuple[list[int], list[int]]], type_a: int, type_b: int):
        (self.prefix, self.prefix_types), (self.middle, self.middle_types), (self.suffix, self.suffix_types) = pieces
        self.type_a, self.type_b = type_a, type_b
        self.n_special = len(self.prefix) + len(self.middle) + len(self.suffix)

    @classmethod
    def probe(cls, plain, choice_tok) -> "PairLayout | None":
        """Read the layout off one post-processed pair; None if it is not of that shape or disagrees."""
        enc_a = plain.encode("the first text", add_special_tokens=False)
        enc_b = plain.encode("yes", add_special_tokens=False)
        a, b = enc_a.ids, enc_b.ids
        full = plain.post_process(enc_a, enc_b, add_special_tokens=True)
        ids, types = full.ids, full.type_ids
        text = [i for i, special in enumerate(full.special_tokens_mask) if not special]
        if len(text) != len(a) + len(b) or not a or not b:
            return None
        first_a, last_a, first_b, last_b = text[0], text[len(a) - 1], text[len(a)], text[-1]
        contiguous = last_a - first_a == len(a) - 1 and last_b - first_b == len(b) - 1
        if not contiguous or ids[first_a:last_a + 1] != a or ids[first_b:last_b + 1] != b:
            return None
        pieces = [(ids[:first_a], types[:first_a]), (ids[last_a + 1:first_b], types[last_a + 1:first_b]),
                  (ids[last_b + 1:], types[last_b + 1:])]
        layout = cls(pieces, types[first_a], types[first_b])
        # Constant type ids per sequence are assumed; the check against the tokenizer catches the rest.
        return layout if layout._agrees_with(plain, choice_tok) else None

    def _agrees_with(self, plain, choice_tok) -> bool:
        """Check the assembly against the tokenizer itself, truncated and not."""
        max_length = choice_tok.truncation["max_length"]
        prompts = ["a short prompt?", " ".join(["many words here"] * max_length) + " question?"]
        choices = ["True", "no"]
        prompt_ids = encode_flat(plain, prompts, add_special_tokens=False)
        got = self.encode_choices(plain, prompt_ids, choices * 2, np.array([2, 2]), max_length)
        try:
            want = encode_flat(choice_tok, [(p, c) for p in prompts for c in choices])
        except Exception:  # this tokenizer cannot fit even these: let the direct path report it
            return False
        return not isinstance(got, int) and all(
            np.array_equal(getattr(got, f), getattr(want, f)) for f in ("offsets", "ids", "type_ids"))

    def encode_choices(self, plain, prompt_ids: FlatEncoding, flat_choices: list[str], n_choices: np.ndarray,
                       max_length: int) -> FlatEncoding | int:
        """Encodings of (prompt, choice), the prompt truncated from the left; or the index of a pair that can't fit.

        `prompt_ids`: the prompts' tokens without special tokens (encode_prompts)."""
        if not flat_choices:
            return FlatEncoding(np.zeros(1, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int8))
        distinct: dict[str, int] = {}
        which = np.array([distinct.setdefault(c, len(distinct)) for c in flat_choices], dtype=np.int64)
        a = prompt_ids
        b = encode_flat(plain, list(distinct), add_special_tokens=False)
        row = np.repeat(np.arange(len(n_choices)), n_choices)
        len_a, len_b = a.lengths[row].astype(np.int64), b.lengths[which].astype(np.int64)
        to_remove = np.maximum(len_a + len_b + self.n_special - max_length, 0)
        too_long = (to_remove > 0) & (len_a <= to_remove)  # the tokenizer refuses these too
        if too_long.any():
            return int(np.argmax(too_long))
        keep = len_a - to_remove
        # One source array: specials, then all prompt tokens, then all distinct-choice tokens.
        specials = np.array(self.prefix + self.middle + self.suffix, dtype=np.int32)
        special_types = np.array(self.prefix_types + self.middle_types + self.suffix_types, dtype=np.int8)
        base_a, base_b = len(specials), len(specials) + len(a.ids)
        src_ids = np.concatenate([specials, a.ids, b.ids])
        src_types = np.concatenate([special_types, np.full(len(a.ids), self.type_a, np.int8),
                                    np.full(len(b.ids), self.type_b, np.int8)])
        n_pre, n_mid, n_suf = len(self.prefix), len(self.middle), len(self.suffix)
        m = len(flat_choices)
        starts = np.stack([
            np.zeros(m, np.int64),                                   # prefix
            base_a + a.offsets[row].astype(np.int64) + to_remove,    # prompt, its first tokens dropped
            np.full(m, n_pre, np.int64),                             # middle
            base_b + b.offsets[which].astype(np.int64),              # choice, whole
            np.full(m, n_pre + n_mid, np.int64),                     # suffix
        ], axis=1)
        lengths = np.stack([np.full(m, n_pre), keep, np.full(m, n_mid), len_b, np.full(m, n_suf)], axis=1)
        gather = concat_ranges(starts.ravel(), lengths.ravel().astype(np.int64))
        offsets = np.zeros(m + 1, dtype=np.int32)
        np.cumsum(lengths.sum(axis=1), out=offsets[1:])
        return FlatEncoding(offsets, src_ids[gather], src_types[gather])


def list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=pa.list_(pa.from_numpy_dtype(values.dtype)))


def nested_list_array(row_offsets: np.ndarray, seq_offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    inner = list_array(seq_offsets, values)
    return pa.ListArray.from_arrays(pa.array(row_offsets), inner, type=pa.list_(inner.type))


def _too_long_choice(batch: pa.RecordBatch, flat_choices: list[str], n_choices: np.ndarray, k: int,
                     max_length: int, raw_path: Path) -> PipelineError:
    row = int(np.repeat(np.arange(len(n_choices)), n_choices)[k])
    idx = batch.column("idx")[row].as_py()
    return PipelineError(
        f"tokenize: {raw_path} row idx={idx}: choice {flat_choices[k][:60]!r} does not fit max_length "
        f"{max_length} even with the prompt truncated to one token"
    )
