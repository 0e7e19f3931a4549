"""Summarise a py-spy ``--format raw`` profile: the functions where samples land (self) and the
ones they pass through (inclusive), and the share of each thread.

    python -m bench.profile_top PROFILE.txt [--top 25]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in a.path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        k = int(n)
        frames = stack.split(";")
        total += k
        threads[frames[0]] += k
        self_c[frames[-1]] += k
        for f in set(frames[1:]):
            incl[f] += k
    print(f"{total} samples")
    for t, k in threads.most_common():
        print(f"  {100 * k / total:5.1f}%  {t}")
    print("\nself")
    for f, k in self_c.most_common(a.top):
        print(f"  {100 * k / total:5.1f}%  {f}")
    print("\ninclusive")
    for f, k in incl.most_common(a.top):
        print(f"  {100 * k / total:5.1f}%  {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
