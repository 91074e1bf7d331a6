"""Prefix cache: a radix tree over token ids whose nodes own KV slots (LightLLM's dynamic prompt
cache, SGLang's RadixCache). Imports no torch.

The pool has one slot per token, so a node's edge is a run of token ids and the slots holding
their K/V, without block rounding: a match is exact to the token. The K/V of position p depends
on every token before it, so a path from the root is valid only as a prefix, which is what a
trie gives. Sequences attach a path by `lock`ing its deepest node (every node above it counts
the hold); nodes no sequence holds are `evictable`: their slots count as free and `evict` hands
them back, least recently used leaf tails first.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class Node:
    """An edge of the tree: `key` tokens whose K/V are in `slots` (same length)."""

    key: list[int]
    slots: list[int]
    parent: Node | None
    children: dict[int, Node] = field(default_factory=dict)
    refs: int = 0  # sequences holding this node or one below it
    last_used: int = 0


class PrefixCache:
    """The tree, its hold counts and its least-recently-used eviction."""

    def __init__(self) -> None:
        self.root = Node([], [], None, refs=1)  # never evicted
        self._clock = itertools.count(1)
        self.total_tokens = 0  # slots owned by the tree
        self.evictable_tokens = 0  # of those, in nodes no sequence holds
        self.evicted_tokens = 0  # counter: slots handed back by `evict`

    @property
    def locked_tokens(self) -> int:
        """Tree slots some running sequence holds (counted once however many share them)."""
        return self.total_tokens - self.evictable_tokens

    # ---- lookup and insertion ----------------------------------------------------------
    def match(self, tokens: Sequence[int], limit: int) -> tuple[Node, list[int]]:
        """Longest cached prefix of `tokens[:limit]`: (its deepest node, its slots).

        A match ending inside an edge splits it, so the node returned ends exactly there."""
        tokens = _as_list(tokens)
        node, slots, i = self.root, [], 0
        now = next(self._clock)
        while i < limit:
            child = node.children.get(tokens[i])
            if child is None:
                break
            n = _common(child.key, tokens, i, limit)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_used = now
            slots.extend(child.slots)
            node, i = child, i + n
        return node, slots

    def insert(
        self, node: Node, tokens: Sequence[int], slots: Sequence[int]
    ) -> tuple[Node, list[int], list[int]]:
        """Hang `tokens`/`slots` below `node` (whose path is the prefix before them).

        Returns (the deepest node, the tree's slots for `tokens`, the caller's slots the tree
        already had K/V for: duplicates the caller frees). The caller holds `node`, so nothing
        on its path is evicted meanwhile."""
        tokens, slots = _as_list(tokens), _as_list(slots)
        now = next(self._clock)
        tree_slots: list[int] = []
        dup: list[int] = []
        i = 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                child = Node(list(tokens[i:]), list(slots[i:]), node, last_used=now)
                node.children[tokens[i]] = child
                self.total_tokens += len(child.key)
                self.evictable_tokens += len(child.key)
                tree_slots.extend(child.slots)
                return child, tree_slots, dup
            n = _common(child.key, tokens, i, len(tokens))
            if n < len(child.key):
                child = self._split(child, n)
            child.last_used = now
            tree_slots.extend(child.slots)
            dup.extend(s for s, t in zip(slots[i : i + n], child.slots, strict=True) if s != t)
            node, i = child, i + n
        return node, tree_slots, dup

    def _split(self, child: Node, n: int) -> Node:
        """Cut `child`'s edge after `n` tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.key)
        upper = Node(child.key[:n], child.slots[:n], parent, refs=child.refs)
        upper.last_used = child.last_used
        parent.children[child.key[0]] = upper
        child.key, child.slots, child.parent = child.key[n:], child.slots[n:], upper
        upper.children[child.key[0]] = child
        return upper

    # ---- holds ---------------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        """A sequence holds the path root -> `node`."""
        now = next(self._clock)
        while node is not self.root:
            if node.refs == 0:
                self.evictable_tokens -= len(node.key)
            node.refs += 1
            node.last_used = now
            assert node.parent is not None
            node = node.parent

    def unlock(self, node: Node) -> None:
        """Drop one hold on the path root -> `node`."""
        while node is not self.root:
            node.refs -= 1
            assert node.refs >= 0
            if node.refs == 0:
                self.evictable_tokens += len(node.key)
            assert node.parent is not None
            node = node.parent

    # ---- eviction ------------------------------------------------------------------------
    def evict(self, n: int) -> list[int]:
        """Free at least `n` slots (or all evictable ones) from unheld leaves, oldest first."""
        freed: list[int] = []
        heap = [(leaf.last_used, id(leaf), leaf) for leaf in self._leaves() if leaf.refs == 0]
        heapq.heapify(heap)
        while heap and len(freed) < n:
            _, _, leaf = heapq.heappop(heap)
            take = min(len(leaf.key), n - len(freed))
            freed.extend(leaf.slots[len(leaf.slots) - take :])
            self.total_tokens -= take
            self.evictable_tokens -= take
            if take < len(leaf.key):  # trim the tail: the rest of the edge stays cached
                del leaf.key[-take:], leaf.slots[-take:]
                break
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            if parent is not self.root and not parent.children and parent.refs == 0:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        self.evicted_tokens += len(freed)
        return freed

    def _leaves(self) -> Iterator[Node]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                yield node

    def all_slots(self) -> list[int]:
        """Every slot the tree owns (tests: slot accounting)."""
        out: list[int] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            out.extend(node.slots)
            stack.extend(node.children.values())
        return out


def _as_list(values: Sequence[int]) -> list[int]:
    """Lists compare with lists only (a list never equals a tuple): keys and queries alike."""
    return values if isinstance(values, list) else list(values)


def _common(key: Sequence[int], tokens: Sequence[int], start: int, limit: int) -> int:
    """Length of the common prefix of `key` and `tokens[start:limit]` (slice compares run in C;
    a binary search over them finds the first difference)."""
    n = min(len(key), limit - start)
    lo, hi = 0, n  # key[:lo] matches; key[:hi + 1] does not (or hi == n)
    if key[:n] == tokens[start : start + n]:
        return n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if key[lo:mid] == tokens[start + lo : start + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of `a[:limit]` and `b`."""
    return _common(b, a, 0, min(limit, len(a)))
