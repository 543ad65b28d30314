"""A small max-flow / min-cut (Dinic's algorithm) for the min-cut partitioner."""
from __future__ import annotations

from collections import deque

INF = float("inf")


class FlowGraph:
    """Directed graph with capacities; nodes are hashable names."""

    def __init__(self) -> None:
        self.index: dict = {}
        self.to: list[int] = []
        self.cap: list[float] = []
        self.adj: list[list[int]] = []

    def node(self, name) -> int:
        i = self.index.get(name)
        if i is None:
            i = self.index[name] = len(self.adj)
            self.adj.append([])
        return i

    def add_edge(self, u, v, capacity: float) -> None:
        a, b = self.node(u), self.node(v)
        self.adj[a].append(len(self.to))
        self.to.append(b)
        self.cap.append(capacity)
        self.adj[b].append(len(self.to))
        self.to.append(a)
        self.cap.append(0.0)

    def _bfs(self, s: int, t: int) -> list[int]:
        level = [-1] * len(self.adj)
        level[s] = 0
        q = deque([s])
        while q:
            u = q.popleft()
            for e in self.adj[u]:
                if self.cap[e] > 0 and level[self.to[e]] < 0:
                    level[self.to[e]] = level[u] + 1
                    q.append(self.to[e])
        return level

    def _dfs(self, u: int, t: int, f: float, level: list[int], it: list[int]) -> float:
        # NOTE: iterative would be safer for huge graphs; joint graphs are shallow enough
        if u == t:
            return f
        while it[u] < len(self.adj[u]):
            e = self.adj[u][it[u]]
            v = self.to[e]
            if self.cap[e] > 0 and level[v] == level[u] + 1:
                d = self._dfs(v, t, min(f, self.cap[e]), level, it)
                if d > 0:
                    self.cap[e] -= d
                    self.cap[e ^ 1] += d
                    return d
            it[u] += 1
        return 0.0

    def min_cut(self, source, sink) -> tuple[float, set]:
        """(max flow value, names reachable from source in the residual graph)."""
        s, t = self.node(source), self.node(sink)
        flow = 0.0
        while True:
            level = self._bfs(s, t)
            if level[t] < 0:
                break
            it = [0] * len(self.adj)
            while True:
                f = self._dfs(s, t, INF, level, it)
                if f <= 0:
                    break
                if f == INF:
                    raise ValueError("infinite flow: every cut crosses an uncuttable edge")
                flow += f
        level = self._bfs(s, t)
        names = {name for name, i in self.index.items() if level[i] >= 0}
        return flow, names
