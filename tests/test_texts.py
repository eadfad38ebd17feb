"""The embedded texts: the parsed Wikipedia extract is cached on disk and survives a bad cache."""

from rankcut.data import embedded as texts


def test_parsed_wiki_text_is_cached_and_a_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path))
    parses = []
    monkeypatch.setattr(texts, "_parse_wiki", lambda source: (parses.append(source), ("An article.",))[1])
    texts.wiki_articles.cache_clear()
    try:
        assert texts.wiki_articles() == ("An article.",) and len(parses) == 1
        (cached,) = (tmp_path / "texts").glob("gensim-wiki-*.json")
        texts.wiki_articles.cache_clear()
        assert texts.wiki_articles() == ("An article.",) and len(parses) == 1  # read, not parsed
        cached.write_text("{half a fi")
        texts.wiki_articles.cache_clear()
        assert texts.wiki_articles() == ("An article.",) and len(parses) == 2  # parsed again
        assert cached.read_text().startswith("[")
    finally:
        texts.wiki_articles.cache_clear()
