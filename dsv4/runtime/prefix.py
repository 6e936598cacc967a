"""A radix tree over token-id sequences: which stored sequences share the longest prefix with a
query, in time proportional to the query's length (not to how many sequences are stored).

    tree = PrefixTree()
    tree.insert(session, session.tokens)
    depth, candidates = tree.match(prompt)   # [(key, shared prefix length), ...]
    tree.remove(session)

Edges hold runs of token ids (a compressed trie); a node where a stored sequence ends holds its key.
`match` returns the keys whose sequences end on the query's path (each shares its whole length)
and a few keys below the deepest point reached (each shares exactly that depth).
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any


class _Node:
    __slots__ = ("children", "edge", "keys", "parent")

    def __init__(self, edge: tuple[int, ...], parent: _Node | None) -> None:
        self.edge, self.parent = edge, parent
        self.children: dict[int, _Node] = {}   # first token of the child's edge -> child
        self.keys: set[Any] = set()            # sequences ending exactly here


class PrefixTree:
    def __init__(self) -> None:
        self._root = _Node((), None)
        self._where: dict[Any, _Node] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._where

    def insert(self, key: Hashable, tokens: Sequence[int]) -> None:
        """Store `tokens` under `key` (replacing what the key held)."""
        if key in self._where:
            self.remove(key)
        node, i, tokens = self._root, 0, tuple(tokens)
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = _Node(tokens[i:], node)
                node.children[tokens[i]] = leaf
                node = leaf
                break
            n = _common(child.edge, tokens, i)
            if n < len(child.edge):                 # split the edge where the sequences part
                middle = _Node(child.edge[:n], node)
                node.children[tokens[i]] = middle
                child.edge, child.parent = child.edge[n:], middle
                middle.children[child.edge[0]] = child
                child = middle
            node, i = child, i + n
        node.keys.add(key)
        self._where[key] = node

    def remove(self, key: Hashable) -> None:
        node = self._where.pop(key)
        node.keys.discard(key)
        while node is not self._root and not node.keys and not node.children:   # prune the dead end
            parent = node.parent
            del parent.children[node.edge[0]]
            node = parent
        if node is not self._root and not node.keys and len(node.children) == 1:  # merge a pass-through
            (child,) = node.children.values()
            child.edge, child.parent = node.edge + child.edge, node.parent
            node.parent.children[node.edge[0]] = child

    def match(self, tokens: Sequence[int], below: int = 8) -> tuple[int, list[tuple[Any, int]]]:
        """(the longest prefix of `tokens` any stored sequence shares, candidates): every key whose
        sequence ends on the way (sharing its whole length), then up to `below` keys of sequences
        going on past the deepest point reached (sharing exactly that depth)."""
        node, i, found = self._root, 0, []
        tokens = tuple(tokens)
        while True:
            found.extend((key, i) for key in node.keys)
            child = node.children.get(tokens[i]) if i < len(tokens) else None
            if child is None:
                deeper = list(node.children.values())
                break
            n = _common(child.edge, tokens, i)
            i += n
            if n < len(child.edge):
                deeper = [child]
                break
            node = child
        for key in _some_keys(deeper, below):
            found.append((key, i))
        return i, found


def _common(edge: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
    n = min(len(edge), len(tokens) - start)
    for j in range(n):
        if edge[j] != tokens[start + j]:
            return j
    return n


def _some_keys(nodes: list[_Node], limit: int) -> list[Any]:
    """Up to `limit` keys stored under `nodes` (depth first)."""
    out, stack = [], list(nodes)
    while stack and len(out) < limit:
        node = stack.pop()
        out.extend(list(node.keys)[: limit - len(out)])
        stack.extend(node.children.values())
    return out
