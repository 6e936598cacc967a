"""The radix tree the server finds resident sessions with: random inserts and removals against a
brute-force longest-common-prefix scan, and lookups that walk the query, not the stored sequences."""
from __future__ import annotations

import random

import pytest

from dsv4.runtime.prefix import PrefixTree

SEED = random.randrange(1 << 30)


def lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("trial", range(40))
def test_random_trees_match_a_linear_scan(trial):
    rng = random.Random(SEED + trial)
    tree, stored = PrefixTree(), {}
    for _ in range(60):
        if rng.random() < 0.6 or not stored:          # a new sequence, often extending or leaving another
            key = rng.randrange(25)
            base = list(rng.choice(list(stored.values()))) if stored and rng.random() < 0.7 else []
            tokens = base[: rng.randrange(len(base) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(6))]
            tree.insert(key, tokens)
            stored[key] = tokens
        else:
            key = rng.choice(list(stored))
            tree.remove(key)
            del stored[key]
        query = [rng.randrange(3) for _ in range(rng.randrange(10))]
        if stored and rng.random() < 0.5:
            query = list(rng.choice(list(stored.values())))[: rng.randrange(9)] + query[:3]
        depth, found = tree.match(query, below=100)
        best = max((lcp(s, query) for s in stored.values()), default=0)
        assert depth == best, f"seed {SEED + trial}"
        assert all(lcp(stored[key], query) == shared for key, shared in found), f"seed {SEED + trial}"
        deepest = {key for key, s in stored.items() if lcp(s, query) == best}
        assert {key for key, shared in found if shared == depth} == deepest, f"seed {SEED + trial}"
        ending_on_the_way = {key for key, s in stored.items() if len(s) == lcp(s, query)}
        assert ending_on_the_way <= {key for key, _ in found}, f"seed {SEED + trial}"
        assert len(tree) == len(stored)


def test_sessions_extending_and_leaving_a_prompt():
    tree = PrefixTree()
    tree.insert("turn1", [1, 2, 3, 4, 5])                 # a finished first turn
    tree.insert("other", [1, 2, 9])
    depth, found = tree.match([1, 2, 3, 4, 5, 6, 7])     # its next turn: extends it
    assert depth == 5 and ("turn1", 5) in found and ("other", 2) not in found
    depth, found = tree.match([1, 2, 3, 8])              # a re-rendered history leaves it at 3
    assert depth == 3 and found == [("turn1", 3)]
    tree.remove("turn1")
    assert tree.match([1, 2, 3, 8]) == (2, [("other", 2)])
    tree.remove("other")
    assert tree.match([1, 2]) == (0, []) and len(tree) == 0


def test_a_lookup_costs_the_query_not_the_number_of_sequences(monkeypatch):
    from dsv4.runtime import prefix

    tree = PrefixTree()
    for i in range(5000):                                # 5000 sessions sharing a 200-token prefix
        tree.insert(i, list(range(200)) + [1000 + i, 7])
    compared = []
    real = prefix._common
    monkeypatch.setattr(prefix, "_common", lambda edge, tokens, start: compared.append(edge) or real(edge, tokens, start))
    depth, found = tree.match(list(range(200)) + [1000 + 4321, 7, 8], below=4)
    assert depth == 202 and (4321, 202) in found
    assert len(compared) == 2                            # the shared 200-token edge, then that session's own
