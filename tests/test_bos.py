"""BOS where the model expects it: calibration windows, training windows, sweep proxies and
scoring contexts open with exactly the tokens the model's tokenizer puts before any text by
default (lm-eval's rule), never a duplicate, and nothing where the tokenizer adds none."""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors

import rankcut
from rankcut.calibration.sources import calibration_ids
from rankcut.core.model_facts import leading_special_ids, prefixed_windows
from rankcut.data.embedded import embedded_text
from rankcut.evaluate.perplexity import tokenize_text
from rankcut.evaluate.scoring import encode_pair, loglikelihoods
from rankcut.io.zoo import byte_tokenizer
from rankcut.study.sweep import proxy_ids
from rankcut.train.data import LMData
from rankcut.train.heal import Heal

BOS = 256  # "<s>" in the tiny byte vocabulary


def llama_style_tokenizer():
    """The tiny byte tokenizer, made to put BOS before every text as Llama's does."""
    tok = byte_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return tok


@pytest.fixture
def bos_model():
    model = rankcut.load_model("tiny-llama")
    rankcut.record_of(model).tokenizer = llama_style_tokenizer()
    return model


def test_the_leading_tokens_are_read_off_the_tokenizer():
    assert leading_special_ids(llama_style_tokenizer()) == [BOS]
    assert leading_special_ids(byte_tokenizer()) == []  # GPT-2/SmolLM2 style: nothing before the text
    assert leading_special_ids(byte_tokenizer(bert_style=True)) == [BOS]  # BERT style: its [CLS]


def test_calibration_windows_open_with_bos_once(bos_model):
    calib = rankcut.Calibration(text="gensim-news", samples=6, seqlen=40)
    ids = calibration_ids(bos_model, calib)
    assert ids.shape == (6, 40)
    assert (ids[:, 0] == BOS).all() and not (ids[:, 1:] == BOS).any()
    stream = tokenize_text(bos_model, embedded_text("gensim-news")).tolist()
    text = ",".join(map(str, stream))
    for row in ids[:, 1:].tolist():  # each body is a run of the text's own tokens
        assert ",".join(map(str, row)) in text


def test_without_a_leading_token_calibration_is_the_plain_stream():
    model = rankcut.load_model("tiny-llama")
    calib = rankcut.Calibration(text="gensim-news", samples=4, seqlen=32)
    ids = calibration_ids(model, calib)
    assert not (ids == BOS).any()
    stream = ",".join(map(str, tokenize_text(model, embedded_text("gensim-news")).tolist()))
    assert all(",".join(map(str, row)) in stream for row in ids.tolist())


def test_training_and_proxy_windows_open_with_bos(bos_model):
    chunks = LMData(bos_model, Heal(seqlen=32, batch_size=2)).chunks
    assert chunks.shape[1] == 32 and (chunks[:, 0] == BOS).all() and not (chunks[:, 1:] == BOS).any()
    proxy = proxy_ids(bos_model, 128, window=64)
    assert proxy.shape == (2, 64) and (proxy[:, 0] == BOS).all()
    plain = torch.arange(10)
    assert torch.equal(prefixed_windows(plain, 5, []), plain.view(2, 5))
    assert prefixed_windows(plain, 4, [BOS]).tolist() == [[BOS, 0, 1, 2], [BOS, 3, 4, 5], [BOS, 6, 7, 8]]


def test_scoring_contexts_open_with_bos_and_never_twice():
    tok, plain = llama_style_tokenizer(), byte_tokenizer()
    ctx, cont = encode_pair(tok, "The sky is", " blue")
    assert ctx[0] == BOS and ctx[1:] == encode_pair(plain, "The sky is", " blue")[0]
    assert cont == encode_pair(plain, "The sky is", " blue")[1]
    assert encode_pair(tok, "", "Hello") == ([BOS], plain("Hello", add_special_tokens=False)["input_ids"])
    spelled, _ = encode_pair(tok, "<s>The sky is", " blue")  # text that spells out the BOS keeps one
    assert spelled[:2] != [BOS, BOS] and spelled[0] == BOS


@torch.no_grad()
def test_a_scored_choice_is_the_log_probability_after_bos(bos_model):
    """Against the definition: log p(continuation | BOS + context) from one plain forward."""
    (score,), = loglikelihoods(bos_model, [[("The sky is", " blue")]], progress=False)
    tok = byte_tokenizer()
    ctx, cont = tok("The sky is", add_special_tokens=False)["input_ids"], tok(" blue", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[BOS, *ctx, *cont]])
    logprobs = torch.log_softmax(bos_model(input_ids=ids).logits[0].double(), -1)
    expected = sum(logprobs[len(ctx) + i, t].item() for i, t in enumerate(cont))
    assert score.loglik == pytest.approx(expected, abs=1e-4)
