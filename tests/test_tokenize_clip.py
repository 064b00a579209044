"""tokenize: long texts cut to max_length words before tokenizing change no output byte.

Each comparison tokenizes the same raw file twice, with `CLIP_LONG_TEXTS` on and off, and
compares the files byte for byte (pair, choice and seq2seq columns, metadata included), for the
MiniLM WordPiece tokenizer and a small SentencePiece-Unigram tokenizer built like transformers'
T5 conversion, on rows made to hit the edge cases: cut texts that run short of tokens (zero-width
spaces), pairs whose other text has more tokens than the cut one, both texts cut, odd and even
token budgets, texts of about max_length words, whitespace runs, non-ASCII spaces, unicode.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import pipeline_src.data.tokenize as tok
from pipeline_src.data.download import download_task
from pipeline_src.data.tokenize import (
    clip_words, clip_words_agrees, encode_pairs, encode_prompts, load_fast_tokenizer, make_backends, tokenize_split,
)

ZWSP = "\u200b"  # zero-width space: BERT's normalizer deletes it, so a "word" of it yields no token
WORDS = ["the", "Question:", "don't", "e.g.", "U.S.A.", "12,345.67", "naïve", "CAFÉ", "東京都", "—", "...",
         "(x)", "[SEP]", "<unk>", "🙂", "co-operate", "O'Neil's", "İstanbul", "ß", "½", "ﬁne", "x\xa0y", "a\x1cb",
         "z" * 120, "supercalifragilistic", "passage", "answer", "\u0301e"]
SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", " \n ", "\r\n", " " * 12, "\n\n\t  ", " \xa0 ", " \u3000 "]


def _text(rng: random.Random, n_words: int, zero_width: float = 0.05) -> str:
    parts = []
    for _ in range(n_words):
        word = ZWSP if rng.random() < zero_width else rng.choice(WORDS)
        parts += [word, rng.choice(SEPARATORS)]
    return "".join(parts).rstrip() if rng.random() < 0.5 else "".join(parts)


def _rows(n: int) -> list[tuple[str, str]]:
    """(passage, question) pairs around n = max_length words."""
    rng = random.Random(n)
    many_tokens = " ".join(["Ünïcödé東京12,345.67"] * (n // 2))  # few words, many tokens each
    rows = [(_text(rng, 6 * n), _text(rng, 5)) for _ in range(4)]
    rows += [(_text(rng, 6 * n), _text(rng, 2 * n)) for _ in range(3)]       # both texts cut
    rows += [(_text(rng, k), _text(rng, 3)) for k in (n - 2, n - 1, n, n + 1, n + 2)]
    rows += [(_text(rng, n + 1), _text(rng, n)), (_text(rng, n), _text(rng, n + 1))]
    rows += [(_text(rng, 6 * n), many_tokens), (many_tokens, _text(rng, 6 * n))]  # the other text has more tokens
    rows += [
        ("word " + f"{ZWSP} " * (3 * n) + _text(rng, 2 * n), "is it"),        # the cut passage has one token
        (_text(rng, 6 * n), f"{ZWSP} " * (3 * n) + "is it"),                  # and the prompt's end has two
        ("\n\n \t" + "   \n ".join(_text(rng, 5) for _ in range(n)) + " \n\n", _text(rng, 4)),
        (_text(rng, 6 * n, zero_width=0.5), _text(rng, n, zero_width=0.5)),
        (" ".join(WORDS * 3), ""),
    ]
    return rows


def _boolq_raw(data_root: Path, out: Path, rows: list[tuple[str, str]]) -> Path:
    records = [{"question": q, "passage": p, "idx": i, "label": i % 2 == 0} for i, (p, q) in enumerate(rows)]
    (data_root / "super_glue/BoolQ/val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    download_task("boolq", out, files_root=data_root, splits=["dev"])
    return out / "boolq/dev.parquet"


def _unigram_tokenizer(texts: list[str], strip_right: bool = True):
    """A SentencePiece-Unigram tokenizer as transformers converts T5's (NFKC-like normalizer, right
    strip, runs of spaces squeezed, Metaspace, "$A </s>"), trained on `texts`."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram())
    strip = [normalizers.Strip(left=False, right=True)] if strip_right else []
    backend.normalizer = normalizers.Sequence(
        [normalizers.Nmt(), normalizers.NFKC()] + strip + [normalizers.Replace(Regex(" {2,}"), "\u2581")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                special_tokens=[("</s>", backend.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def t5_style_dir(tmp_path_factory) -> str:
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("t5_style")
    _unigram_tokenizer([_text(rng, 40) for _ in range(300)]).save_pretrained(folder)
    return str(folder)


def test_clip_words():
    text = "  one two,\tthree\n\nfour  five "
    assert clip_words(text, 2) == "  one two,"
    assert clip_words(text, 2, keep="end") == "four  five "
    assert clip_words(text, 4, keep="end") == "two,\tthree\n\nfour  five "
    assert clip_words(text, 5) == text and clip_words(text, 5, keep="end") == text  # at most n words: untouched
    assert clip_words("a\xa0b\u3000c d", 1) == "a\xa0b\u3000c"  # only ASCII whitespace separates words
    assert clip_words("", 3) == "" and clip_words("   ", 1, keep="end") == "   "


@pytest.mark.parametrize("layout", ["assembled", "direct"])
@pytest.mark.parametrize("max_length", [16, 17])  # odd and even token budgets
@pytest.mark.parametrize("tokenizer", ["minilm", "t5_style"])
def test_clipping_changes_no_output_byte(tokenizer, max_length, layout, request, tiny_data_root, monkeypatch,
                                         tmp_path):
    path = request.getfixturevalue("minilm_tokenizer_path" if tokenizer == "minilm" else "t5_style_dir")
    if layout == "direct":
        monkeypatch.setattr(tok.PairLayout, "probe", classmethod(lambda cls, plain, choice: None))
    assert make_backends(load_fast_tokenizer(path), max_length).clip  # the cut is in use
    raw = _boolq_raw(tiny_data_root, tmp_path / "raw", _rows(max_length))
    outputs = {}
    for clip in (True, False):
        monkeypatch.setattr(tok, "CLIP_LONG_TEXTS", clip)
        outputs[clip] = tmp_path / f"clip_{clip}.parquet"
        tokenize_split(raw, outputs[clip], path, max_length, batch_rows=7, max_target_length=4)
    assert outputs[True].read_bytes() == outputs[False].read_bytes()


def test_whole_text_where_the_cut_one_could_differ(minilm_tokenizer_path):
    """The cases where the cut text gives another encoding are the ones tokenized whole."""
    n = 16
    backends = make_backends(load_fast_tokenizer(minilm_tokenizer_path), n)
    pair, plain = backends.pair, backends.plain
    long_text = "the rest of a long passage, " * 20

    # A cut text short of tokens: its first 16 words are one word and 15 zero-width spaces.
    passage = "word " + f"{ZWSP} " * (3 * n) + long_text
    cut = clip_words(passage, n)
    assert cut != passage and len(plain.encode(cut, add_special_tokens=False)) == 1
    assert pair.encode(cut, "is it").ids != pair.encode(passage, "is it").ids
    assert encode_pairs(backends, [passage], ["is it"]).ids.tolist() == pair.encode(passage, "is it").ids

    # The other text has more tokens than the cut one: with an odd budget (16 - 3 specials) the
    # longer text keeps the odd token, and the whole passage is the longer one.
    question = " ".join(["Ünïcödé東京12,345.67"] * 8)
    cut = clip_words(long_text, n)
    assert len(plain.encode(cut, add_special_tokens=False)) < len(plain.encode(question, add_special_tokens=False))
    assert pair.encode(cut, question).ids != pair.encode(long_text, question).ids
    assert encode_pairs(backends, [long_text], [question]).ids.tolist() == pair.encode(long_text, question).ids

    # A prompt whose last 16 words are mostly zero-width spaces: kept whole.
    prompt = long_text + "\nQuestion: " + f"{ZWSP} " * (3 * n) + "is it? Yes or No?"
    texts, prompt_ids = encode_prompts(backends, [prompt, long_text])
    assert texts == [prompt, clip_words(long_text, n, keep="end")]
    assert prompt_ids.ids[:prompt_ids.offsets[1]].tolist() == plain.encode(prompt, add_special_tokens=False).ids


def test_clipping_off_where_its_premise_fails(minilm_tokenizer_path):
    """Byte-level BPE (a word's first token depends on the space before it), a normalizer that
    turns a zero-width space into a space it keeps at the end, an added token with a space in it:
    every text is tokenized whole."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer

    texts = [_text(random.Random(k), 40) for k in range(200)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, show_progress=False)
    no_strip = _unigram_tokenizer(texts, strip_right=False).backend_tokenizer
    assert not clip_words_agrees(bpe) and not clip_words_agrees(no_strip)
    plain = make_backends(load_fast_tokenizer(minilm_tokenizer_path), 64).plain
    assert clip_words_agrees(plain)
    plain.add_tokens([AddedToken("new york")])
    assert not clip_words_agrees(plain)


def test_clipping_changes_no_output_byte_on_real_dev_splits(real_data_root, minilm_tokenizer_path, monkeypatch,
                                                            tmp_path):
    for task in ("boolq", "cb", "rte"):
        download_task(task, tmp_path / "raw", files_root=real_data_root, source="files", splits=["dev"])
        raw = tmp_path / "raw" / task / "dev.parquet"
        outputs = {}
        for clip in (True, False):
            monkeypatch.setattr(tok, "CLIP_LONG_TEXTS", clip)
            outputs[clip] = tmp_path / f"{task}_{clip}.parquet"
            tokenize_split(raw, outputs[clip], minilm_tokenizer_path, 64, max_target_length=16)
        assert outputs[True].read_bytes() == outputs[False].read_bytes(), task
