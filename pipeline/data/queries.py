"""Text queries for the text student: sampled from a JSON file of terms per category.

Everything is drawn from one `random.Random(seed)`, so the same params give the same sets on every
machine. The sets `build_query_sets` returns (the teacher stage embeds each one) and how a query is
written: docs/students.md, "Text student".
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pipeline.params import TextQueryParams

log = logging.getLogger(__name__)

HELD_OUT_SETS = ("val_combos", "val_terms", "val_free")
# how terms are joined, and the phrase around them, with their relative weights: mostly bare
# term lists, sometimes a few connecting words as people type queries
SEPARATORS = ((", ", 3), (" ", 3), (" with ", 1), (" and ", 1))
FRAMES = (("{}", 6), ("a {} song", 1), ("{} music", 1), ("a {} track", 1))
_MAX_TRIES_PER_QUERY = 50


class QueryTermsError(ValueError):
    """The query-terms JSON file is missing or malformed."""


def load_terms(path: str | Path) -> dict[str, list[str]]:
    """Read ``{"Category": ["Term", ...], ...}``; whitespace-stripped, duplicates removed in order;
    QueryTermsError names the file (and the category) of a missing or malformed file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QueryTermsError(f"{path}: query-terms file not found") from None
    except OSError as exc:
        raise QueryTermsError(f"{path}: cannot read query-terms file: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QueryTermsError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise QueryTermsError(
            f"{path}: expected a JSON object mapping category -> list of terms, got {type(data).__name__}"
        )
    if not data:
        raise QueryTermsError(f"{path}: no categories")
    terms: dict[str, list[str]] = {}
    for category, values in data.items():
        if not isinstance(values, list):
            raise QueryTermsError(f"{path}: category {category!r} must be a list of strings")
        cleaned: list[str] = []
        seen: set[str] = set()
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise QueryTermsError(f"{path}: category {category!r} item {i} is not a string: {value!r}")
            value = " ".join(value.split())
            if value and value not in seen:
                seen.add(value)
                cleaned.append(value)
        if not cleaned:
            raise QueryTermsError(f"{path}: category {category!r} is empty")
        terms[str(category)] = cleaned
    return terms


def case_variants(term: str) -> list[str]:
    """The case forms a query may use for `term`: original, lower, title, upper (deduplicated)."""
    return list(dict.fromkeys([term, term.lower(), term.title(), term.upper()]))


def _choose_held_out(terms: dict[str, list[str]], k: int, rng: random.Random) -> set[str]:
    """Pick up to `k` held-out terms per category (lower-cased), always leaving one to train on.

    Terms that share no word with another term are preferred, so that "unseen term" means an
    unseen word and not, say, "Guitar" while "Bass Guitar" is trained on.
    """
    words_of = {t.lower(): set(t.lower().split()) for ts in terms.values() for t in ts}
    held: set[str] = set()
    for category in terms:  # dict order is file order: deterministic
        pool = sorted(dict.fromkeys(t.lower() for t in terms[category]))
        n = min(k, len(pool) - 1)
        if n <= 0:
            continue
        isolated = [
            t for t in pool if not any(words_of[t] & w for o, w in words_of.items() if o != t)
        ]
        shared = [t for t in pool if t not in isolated]
        rng.shuffle(isolated)
        rng.shuffle(shared)
        held.update((isolated + shared)[:n])
    return held


def _combo_key(parts: Sequence[str]) -> frozenset[str]:
    return frozenset(p.lower() for p in parts)


def _weighted(options: Sequence[tuple[str, int]], rng: random.Random) -> str:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def _compose(parts: Sequence[str], rng: random.Random) -> str:
    joined = _weighted(SEPARATORS, rng).join((p, p.lower(), p.title(), p.upper())[rng.randrange(4)] for p in parts)
    return _weighted(FRAMES, rng).format(joined)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(s for s in (" ".join(x.split()) for x in items) if s))


def _draw(
    n: int, sample: Callable[[], list[str]], keep: Callable[[str, list[str]], bool], rng: random.Random
) -> dict[str, list[str]]:
    """Up to `n` unique queries (query -> its terms), composed from `sample()` and kept when `keep` says so."""
    got: dict[str, list[str]] = {}
    for _ in range(n * _MAX_TRIES_PER_QUERY):
        if len(got) >= n:
            break
        parts = sample()
        query = _compose(parts, rng)
        if query not in got and keep(query, parts):
            got[query] = parts
    return got


def build_query_sets(p: TextQueryParams) -> dict[str, list[str]]:
    """All query sets (see the module doc), deterministic from ``p.seed`` (ranges checked by pipeline.params)."""
    terms = load_terms(p.terms)
    rng = random.Random(p.seed)
    categories = list(terms)
    held = _choose_held_out(terms, p.held_out_terms_per_category, rng)
    seen_pool = {c: [t for t in ts if t.lower() not in held] for c, ts in terms.items()}
    held_pool = {c: [t for t in ts if t.lower() in held] for c, ts in terms.items()}
    seen_cats = [c for c in categories if seen_pool[c]]
    lo = min(p.min_categories, len(seen_cats))
    hi = min(p.max_categories, len(seen_cats))

    # a sampled query that happens to equal a free phrasing would leak it into training
    blocked = {q.lower() for q in _unique(p.free_phrasings)}

    def sample_seen() -> list[str]:
        chosen = rng.sample(seen_cats, rng.randint(lo, hi))
        return [rng.choice(seen_pool[c]) for c in chosen]

    def sample_held() -> list[str]:
        anchor = rng.choice(held_cats)
        n = rng.randint(min(p.min_categories, len(categories)), min(p.max_categories, len(categories)))
        others = [c for c in categories if c != anchor]
        chosen = [anchor] + rng.sample(others, max(0, n - 1))
        rng.shuffle(chosen)
        return [rng.choice(held_pool[c]) if c == anchor else rng.choice(terms[c]) for c in chosen]

    # train: seen terms only, unique query strings
    train = _draw(p.n_train, sample_seen, lambda q, parts: q.lower() not in blocked, rng)
    if p.single_terms:
        # a sampled mix meets a given term alone in a given case only by chance
        for term in (t for c in seen_cats for t in seen_pool[c]):
            for form in case_variants(term):
                if form.lower() not in blocked:
                    train.setdefault(form, [term])
    train_combos = {_combo_key(parts) for parts in train.values()}
    # val_combos: seen terms, but a combination no train query used
    val_combos = _draw(
        p.n_val, sample_seen, lambda q, parts: _combo_key(parts) not in train_combos and q.lower() not in blocked, rng
    )
    # val_terms: at least one held-out term, the rest drawn from all terms
    held_cats = [c for c in categories if held_pool[c]]
    val_terms = _draw(p.n_val, sample_held, lambda q, parts: q.lower() not in blocked, rng) if held_cats else {}

    for name, got, want in (("train", train, p.n_train), ("val_combos", val_combos, p.n_val),
                            ("val_terms", val_terms, p.n_val)):
        if len(got) < want:
            log.warning("text_queries: only %d unique %s queries could be drawn (asked for %d)",
                        len(got), name, want)

    all_terms = [t for ts in terms.values() for t in ts]
    sets = {
        "train": list(train),
        "val_combos": list(val_combos),
        "val_terms": list(val_terms),
        "val_free": _unique(p.free_phrasings),
        "eval_prompts": _unique(p.eval_prompts),
        "terms": _unique(v for t in all_terms for v in case_variants(t)),
    }
    log.info(
        "text queries from %s: %s (%d held-out terms: %s)",
        p.terms, ", ".join(f"{k}={len(v)}" for k, v in sets.items()), len(held), ", ".join(sorted(held)),
    )
    return sets


_SPLIT = re.compile(r"[,\s]+")


def split_into_terms(query: str, vocabulary: Iterable[str]) -> list[str]:
    """Recover the terms a query is made of, for the bag-of-words baseline.

    Words are split at commas and white space; a dynamic programme covers them with the fewest
    vocabulary terms (multi-word terms preferred), skipping words that belong to no term (as in
    "a calm piano song"). Matching ignores case; the returned pieces keep the query's own case.
    """
    words = [w for w in _SPLIT.split(query.strip()) if w]
    known = {" ".join(t.lower().split()) for t in vocabulary}
    longest = max((len(t.split()) for t in known), default=1)
    n = len(words)
    # best[i] = (skipped words, pieces) for words[i:], smaller is better
    best: list[tuple[int, int]] = [(0, 0)] * (n + 1)
    step: list[int] = [0] * (n + 1)  # 0 = skip word i, k > 0 = term of k words
    for i in range(n - 1, -1, -1):
        best[i], step[i] = (best[i + 1][0] + 1, best[i + 1][1]), 0
        for k in range(1, min(longest, n - i) + 1):
            if " ".join(words[i:i + k]).lower() in known:
                cand = (best[i + k][0], best[i + k][1] + 1)
                if cand < best[i]:
                    best[i], step[i] = cand, k
    pieces, i = [], 0
    while i < n:
        if step[i]:
            pieces.append(" ".join(words[i:i + step[i]]))
            i += step[i]
        else:
            i += 1
    return pieces
