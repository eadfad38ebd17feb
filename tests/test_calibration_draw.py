"""How calibration windows are drawn: "spread" covers one document per window across the corpus,
"contiguous" cuts consecutive windows from the first documents of a seeded order."""

from __future__ import annotations

import random

import pytest

import rankcut
from rankcut.calibration.sources import calibration_documents, calibration_ids
from rankcut.core.errors import RankcutError
from rankcut.core.model_facts import get_tokenizer
from rankcut.data.embedded import embedded_text


@pytest.fixture(scope="module")
def model():
    return rankcut.load_model("tiny-llama")


@pytest.fixture(scope="module")
def document_tokens(model):
    tok = get_tokenizer(model)
    return [",".join(map(str, tok(d, add_special_tokens=False)["input_ids"]))
            for d in calibration_documents("gensim-wiki")]


def sources_of(ids, document_tokens) -> list[int]:
    """For each window, the index of the one document whose tokens hold it (-1: none does)."""
    found = []
    for row in ids.tolist():
        text = ",".join(map(str, row))
        hits = [i for i, doc in enumerate(document_tokens) if text in doc]
        found.append(hits[0] if len(hits) == 1 else -1)
    return found


def test_spread_windows_come_from_as_many_documents_as_samples(model, document_tokens):
    calib = rankcut.Calibration(samples=12, seqlen=64, draw="spread")
    ids = calibration_ids(model, calib)
    assert ids.shape == (12, 64)
    sources = sources_of(ids, document_tokens)
    assert -1 not in sources and len(set(sources)) == 12
    assert calibration_ids(model, calib).equal(ids)  # seeded
    assert not calibration_ids(model, rankcut.Calibration(samples=12, seqlen=64, draw="spread", seed=1)).equal(ids)


def test_spread_takes_several_places_per_document_when_samples_outnumber_documents(model, document_tokens):
    documents = len(document_tokens)
    samples = documents + 20
    ids = calibration_ids(model, rankcut.Calibration(samples=samples, seqlen=64, draw="spread"))
    assert ids.shape == (samples, 64)
    assert len({tuple(row) for row in ids.tolist()}) == samples  # no place drawn twice
    sources = sources_of(ids, document_tokens)
    assert -1 not in sources
    assert max(sources.count(i) for i in set(sources)) == 2  # ⌈samples / documents⌉ places a document
    assert len(set(sources)) == -(-samples // 2)


def test_contiguous_windows_are_consecutive_cuts_of_the_first_shuffled_documents(model, document_tokens):
    calib = rankcut.Calibration(samples=12, seqlen=64, draw="contiguous")
    ids = calibration_ids(model, calib)
    tok = get_tokenizer(model)
    docs = calibration_documents("gensim-wiki")
    rng = random.Random(calib.seed)
    rng.shuffle(docs)
    stream: list[int] = []
    for doc in docs:
        stream += tok(doc, add_special_tokens=False)["input_ids"]
        if len(stream) >= 2 * 12 * 64:
            break
    starts = sorted(rng.sample(range(len(stream) // 64), 12))
    assert ids.tolist() == [stream[s * 64:(s + 1) * 64] for s in starts]


def test_spread_on_a_single_document_falls_back_to_consecutive_windows(model, tmp_path):
    text = tmp_path / "one.txt"
    text.write_text(embedded_text("gensim-news")[:20000])
    spread = calibration_ids(model, rankcut.Calibration(text=str(text), samples=4, seqlen=32, draw="spread"))
    contiguous = calibration_ids(model, rankcut.Calibration(text=str(text), samples=4, seqlen=32, draw="contiguous"))
    assert spread.equal(contiguous)


def test_an_unknown_draw_is_one_clear_error():
    with pytest.raises(RankcutError, match="draw 'random' is unknown"):
        rankcut.Calibration(draw="random")
