"""Query sampling: determinism, held-out sets kept out of training, clear errors on bad term files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.params import TextQueryParams
from pipeline.data.queries import (
    QueryTermsError,
    build_query_sets,
    case_variants,
    load_terms,
    split_into_terms,
)
from repo_params import section

TERMS = {
    "Genre": ["Rock", "Jazz", "Hip-Hop", "Folk", "Blues", "Hard Rock"],
    "Instrument": ["Piano", "Electric Guitar", "Drums", "Saxophone", "Violin", "Organ"],
    "Mood": ["Happy", "Sad", "Dark", "Dreamy", "Energetic"],
    "Voice": ["Female Vocal", "Male Vocal", "Choir", "Raspy"],
}


@pytest.fixture()
def params(tmp_path: Path) -> TextQueryParams:
    path = tmp_path / "terms.json"
    path.write_text(json.dumps(TERMS), encoding="utf-8")
    return section(
        "text_queries", terms=str(path), n_train=300, n_val=40, held_out_terms_per_category=1, seed=3, single_terms=False,
        free_phrasings=["a calm piano song", "a calm piano song", "slow jazz"], eval_prompts=["piano"],
    )


def _terms_of(query: str) -> list[str]:
    vocab = [t for ts in TERMS.values() for t in ts]
    return [t.lower() for t in split_into_terms(query, vocab)]


def test_single_terms_add_every_seen_term_alone_in_each_case(params: TextQueryParams) -> None:
    params = replace(params, free_phrasings=["organ", "slow jazz"])
    sampled = build_query_sets(params)
    sets = build_query_sets(replace(params, single_terms=True))
    held = {t.lower() for q in sets["val_terms"] for t in _terms_of(q)} - {
        t.lower() for q in sampled["train"] for t in _terms_of(q)}
    train = set(sets["train"])
    assert set(sampled["train"]) <= train  # the sampled queries stay as they were
    for term in (t for ts in TERMS.values() for t in ts):
        forms = set(case_variants(term))
        if term == "Organ":
            assert not {f.lower() for f in forms} & {q.lower() for q in train}, term  # a free phrasing: held out
        elif term.lower() in held:
            assert not forms & train, term  # held-out terms stay unseen
        else:
            assert forms <= train, term
    assert len(train) == len(sets["train"])  # no duplicates


def test_sets_have_contract_keys_sizes_and_no_duplicates(params: TextQueryParams) -> None:
    sets = build_query_sets(params)
    assert {"train", "val_combos", "val_terms", "val_free", "eval_prompts"} <= set(sets)
    assert len(sets["train"]) == 300
    assert len(sets["val_combos"]) == 40 and len(sets["val_terms"]) == 40
    assert sets["val_free"] == ["a calm piano song", "slow jazz"]
    assert sets["eval_prompts"] == ["piano"]
    for name, queries in sets.items():
        assert len(queries) == len(set(queries)), name


def test_deterministic_and_seed_dependent(params: TextQueryParams) -> None:
    assert build_query_sets(params) == build_query_sets(params)
    assert build_query_sets(params)["train"] != build_query_sets(replace(params, seed=4))["train"]


def test_queries_use_one_term_per_category_in_range(params: TextQueryParams) -> None:
    sets = build_query_sets(replace(params, min_categories=2, max_categories=3))
    category_of = {t.lower(): c for c, ts in TERMS.items() for t in ts}
    sizes = set()
    for query in sets["train"]:
        parts = _terms_of(query)
        cats = [category_of[p] for p in parts]
        # "Hard Rock" may parse as one term; either way each category appears at most once
        assert len(cats) == len(set(cats)), query
        sizes.add(len(parts))
    assert sizes == {2, 3}
    # random case: all four case styles occur
    words = " ".join(sets["train"]).split()
    assert any(w.isupper() and len(w) > 3 for w in words)
    assert any(w.islower() for w in words)
    assert any(w.istitle() for w in words)


def test_held_out_terms_never_in_train(params: TextQueryParams) -> None:
    sets = build_query_sets(params)
    train_terms = {t for q in sets["train"] for t in _terms_of(q)}
    val_terms_terms = [set(_terms_of(q)) for q in sets["val_terms"]]
    held = set().union(*val_terms_terms) - train_terms
    # one held-out term per category, and every val_terms query contains one
    assert len(held) == len(TERMS)
    assert all(ts & held for ts in val_terms_terms)
    assert not held & train_terms


def test_val_combos_are_unseen_combinations_of_seen_terms(params: TextQueryParams) -> None:
    sets = build_query_sets(params)
    train_combos = {frozenset(_terms_of(q)) for q in sets["train"]}
    train_terms = set().union(*train_combos)
    for query in sets["val_combos"]:
        combo = frozenset(_terms_of(query))
        assert combo <= train_terms, query
        assert combo not in train_combos, query
        assert query not in sets["train"]


def test_terms_set_covers_every_case_form(params: TextQueryParams) -> None:
    terms = set(build_query_sets(params)["terms"])
    for t in [t for ts in TERMS.values() for t in ts]:
        assert set(case_variants(t)) <= terms
    assert "HIP-HOP" in terms and "hip-hop" in terms


def test_split_into_terms_prefers_long_terms_and_skips_filler() -> None:
    vocab = ["Hard Rock", "Rock", "Piano", "Calm"]
    assert split_into_terms("HARD ROCK, piano", vocab) == ["HARD ROCK", "piano"]
    assert split_into_terms("a calm piano song", vocab) == ["calm", "piano"]
    assert split_into_terms("nothing here", vocab) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"Genre": "Rock"}', "must be a list"),
        ('{"Genre": ["Rock", 3]}', "not a string"),
        ('{"Genre": ["Rock"], "Mood": ["  "]}', "'Mood' is empty"),
        ("{}", "no categories"),
    ],
)
def test_load_terms_errors_name_the_file(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "bad_terms.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(QueryTermsError, match=message) as info:
        load_terms(path)
    assert "bad_terms.json" in str(info.value)


def test_shipped_terms_file_loads(repo_root: Path) -> None:
    terms = load_terms(repo_root / "data" / "text" / "query_terms.json")
    assert len(terms) >= 3 and all(terms.values())


def test_free_phrasings_never_leak_into_sampled_sets(params: TextQueryParams) -> None:
    # single terms are sampled often: a free phrasing equal to one must still stay out
    sets = build_query_sets(replace(params, free_phrasings=["Rock", "jazz"]))
    for name in ("train", "val_combos", "val_terms"):
        assert not {q.lower() for q in sets[name]} & {"rock", "jazz"}, name
    assert sets["val_free"] == ["Rock", "jazz"]


def test_some_queries_read_like_phrases(params: TextQueryParams) -> None:
    train = build_query_sets(params)["train"]
    assert any(" with " in q for q in train) and any(" and " in q for q in train)
    assert any(q.startswith("a ") and q.endswith((" song", " track")) for q in train)
    assert sum("," in q for q in train) > len(train) / 5  # bare term lists stay the most common


def test_demo_query_terms_file_is_the_demo_captions_words(repo_root: Path) -> None:
    """data/demo/query_terms.json is what pipeline.data.demo_audio.query_terms gives (no drift)."""
    from pipeline.data.demo_audio import query_terms

    committed = load_terms(repo_root / "data" / "demo" / "query_terms.json")
    assert committed == query_terms()
    assert {"Piano", "Organ", "Bells", "Synth", "Drums", "Slow", "Sad"} <= {t for ts in committed.values() for t in ts}
