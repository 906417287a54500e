#!/usr/bin/env python3
"""The module import graph of one crate's src/, and its cycles.

Reads every .rs file under SRC (default transport/src), maps each `crate::x` path and each item
imported from the crate root (`use crate::{A, B}`, resolved through lib.rs's `pub use`) to the
module that defines it, and prints one line per module with what it imports, then every cycle
between top-level modules (a provider folder counts as one module). Exit status 1 when there is
a cycle, so CI can keep the layering true.

    scripts/import-graph.py [SRC]
"""
import os
import re
import sys

src = sys.argv[1] if len(sys.argv) > 1 else "transport/src"


def top(rel):
    """Top-level module of a file: tcp/qp.rs -> tcp, api.rs -> api."""
    rel = rel[:-3] if rel.endswith(".rs") else rel
    part = rel.split("/")[0]
    return part


def strip_comments(text):
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))


lib = strip_comments(open(os.path.join(src, "lib.rs")).read())
# Root re-exports: `pub use module::{A, B};` or `pub use module::A;`
root_items = {}
for m in re.finditer(r"pub use (\w+)::(\{[^}]*\}|\w+);", lib, re.S):
    module, items = m.group(1), m.group(2)
    for item in re.findall(r"\w+", items):
        root_items[item] = module

graph = {}
for dirpath, _, files in os.walk(src):
    for f in files:
        if not f.endswith(".rs") or f == "lib.rs":
            continue
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, src)
        me = top(rel)
        text = strip_comments(open(path).read())
        deps = set(re.findall(r"crate::([a-z_]+)\b", text))
        for group in re.findall(r"crate::\{([^}]*)\}", text, re.S):
            for item in re.findall(r"\b([A-Za-z_]\w*)\b", group):
                if item in root_items:
                    deps.add(root_items[item])
                elif item[0].islower():
                    deps.add(item)
        for item in re.findall(r"crate::([A-Z]\w*)", text):
            if item in root_items:
                deps.add(root_items[item])
        deps = {d for d in deps if d != me and os.path.exists(os.path.join(src, d + ".rs"))
                or os.path.isdir(os.path.join(src, d))}
        deps.discard(me)
        graph.setdefault(me, set()).update(deps)

for m in sorted(graph):
    print(f"{m:14} -> {' '.join(sorted(graph[m])) or '-'}")

# Cycles between top-level modules (Tarjan's strongly connected components).
index, low, stack, on, sccs = {}, {}, [], set(), []


def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


for v in sorted(graph):
    if v not in index:
        visit(v)
if sccs:
    for c in sccs:
        print("cycle:", " <-> ".join(c))
    sys.exit(1)
print("no cycles")
