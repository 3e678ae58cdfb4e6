#!/usr/bin/env python3
"""The layering rules of src/, checked on the code outside unit tests and comments.

1. No import circle between src/'s top-level modules (a folder or a loose file is one module): data flows
   one way, link -> stanza -> router -> handlers -> store / push.
2. At most six loose .rs files at src/: the root holds main, lib, config, app and a few layers; the rest
   lives in folders named for their role.
3. Nothing above the store trait knows sled: `sled` and `SledStore` appear only under src/store/.
4. Nothing above the push seam knows a token's format: handlers/ and the store trait (store/mod.rs) never
   decode or encode hex.

Prints what breaks a rule and exits 1, or prints one line and exits 0.
"""

import collections
import os
import re
import sys

ROOT = "src"
MAX_LOOSE = 6


def code_of(path):
    """The file's text before its unit tests, without comment lines."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read().split("#[cfg(test)]")[0]
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))


def unit_of(path):
    top = os.path.relpath(path, ROOT).split(os.sep)[0]
    return top[:-3] if top.endswith(".rs") else top


def sources():
    for folder, _, files in os.walk(ROOT):
        for name in sorted(files):
            if name.endswith(".rs"):
                yield os.path.join(folder, name)


def circles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main():
    problems = []
    edges = collections.defaultdict(set)
    for path in sources():
        unit, code = unit_of(path), code_of(path)
        for m in re.finditer(r"crate::([a-z_0-9]+)", code):
            target = m.group(1)
            if target != unit and (
                os.path.exists(os.path.join(ROOT, target + ".rs")) or os.path.isdir(os.path.join(ROOT, target))
            ):
                edges[unit].add(target)
        inside_store = os.path.relpath(path, ROOT).startswith("store" + os.sep)
        if not inside_store and re.search(r"\bsled::|\bSledStore\b", code):
            problems.append(f"{path}: names sled or SledStore; only src/store/ may (use the Store trait)")
        if (path.startswith(os.path.join(ROOT, "handlers")) or path == os.path.join(ROOT, "store", "mod.rs")) and re.search(
            r"\bhex::", code
        ):
            problems.append(f"{path}: decodes or encodes hex; token formats belong to each provider in src/push/")
    for component in circles(edges):
        problems.append("modules of src/ import each other: " + " <-> ".join(component))
    loose = sorted(n for n in os.listdir(ROOT) if n.endswith(".rs"))
    if len(loose) > MAX_LOOSE:
        problems.append(f"{len(loose)} loose .rs files at src/ (at most {MAX_LOOSE}): {', '.join(loose)}")
    if problems:
        print("\n".join(problems))
        return 1
    print(f"layers: no import circle among {len(edges)} modules, {len(loose)} loose files at src/, seams kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
