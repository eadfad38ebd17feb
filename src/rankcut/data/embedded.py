"""The embedded default text: English that installs with the `gensim` wheel.

Three sources, all real: a Wikipedia extract (106 articles, ~480k words) for calibration and
training, 300 news articles (Lee background corpus) for quick perplexity, and 200 labelled
movie-review sentences. Nothing is downloaded.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import json
import re
from pathlib import Path

from ..core.errors import RankcutError
from ..core.fsutil import atomic_write_text, cache_root

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
REVIEWS_FILE = "pang_lee_polarity.cor"
EMBEDDED = ("gensim-wiki", "gensim-news")


def gensim_data_dir() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise RankcutError("the embedded texts come with gensim; run `pip install gensim`")
    return Path(spec.origin).parent / "test" / "test_data"


@functools.lru_cache(maxsize=None)
def wiki_articles() -> tuple[str, ...]:
    """Plain text of the extract's real articles (redirects and stubs dropped).

    Parsing the wiki markup takes seconds, a noticeable share of a one-minute compression, so
    the plain text is kept in the cache folder, keyed by the extract's size and time stamp.
    """

    source = gensim_data_dir() / WIKI_FILE
    stat = source.stat()
    cached = cache_root() / "texts" / f"gensim-wiki-{stat.st_size}-{int(stat.st_mtime)}.json"
    try:
        articles = json.loads(cached.read_text(encoding="utf-8"))
        if isinstance(articles, list) and articles and all(isinstance(a, str) for a in articles):
            return tuple(articles)
    except (OSError, ValueError):
        pass  # absent or unreadable: parse again and rewrite it
    articles = _parse_wiki(source)
    try:
        atomic_write_text(cached, json.dumps(list(articles)))
    except OSError:
        pass  # a read-only cache only costs the parse next time
    return articles


def _parse_wiki(source: Path) -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.open(source) as fh:
        for _title, markup, _pid in extract_pages(fh):
            text = filter_wiki(markup).replace("'''", "").replace("''", "")
            text = re.sub(r"\n\s*\n+", "\n\n", text).strip()
            if len(text) > 200 and not text.upper().startswith("#REDIRECT"):
                out.append(text)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def news_articles() -> tuple[str, ...]:
    lines = (gensim_data_dir() / NEWS_FILE).read_text(encoding="latin-1").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def review_sentences() -> list[tuple[str, int]]:
    """(sentence, label) pairs; label 1 = positive."""
    out = []
    for line in (gensim_data_dir() / REVIEWS_FILE).read_text(encoding="cp1252").splitlines():
        label, _, sentence = line.partition(" ")
        if sentence and label in ("__label__neg", "__label__pos"):
            out.append((sentence.strip(), int(label == "__label__pos")))
    return out


def embedded_text(name: str) -> str:
    """One long document: articles joined by blank lines."""
    if name == "gensim-wiki":
        return "\n\n".join(wiki_articles())
    if name == "gensim-news":
        return "\n\n".join(news_articles())
    raise RankcutError(f"unknown embedded text '{name}'; choose one of {', '.join(EMBEDDED)}")
