#!/usr/bin/env python3
"""Top functions of a py-spy raw profile (`py-spy record --format raw`), by self and inclusive
share of the samples. Used by bench/profile.sh and bench/profile_l4egress.sh.

  python bench/top_frames.py STACKS.txt [N]
"""

import collections
import sys


def frame(f):
    """'func (path/to/file.py:12)' -> 'func (file.py)'."""
    if " (" not in f:
        return f
    name, _, where = f.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})"


def main():
    n_top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    self_t, incl, total = collections.Counter(), collections.Counter(), 0
    with open(sys.argv[1]) as fh:  # noqa: PTH123
        for line in fh:
            stack, _, n = line.rstrip().rpartition(" ")
            n = int(n)
            total += n
            frames = [frame(f) for f in stack.split(";")]
            self_t[frames[-1]] += n
            for f in set(frames):
                incl[f] += n
    print(f"samples: {total}\ntop self:")
    for f, n in self_t.most_common(n_top):
        print(f"  {100 * n / total:5.1f}%  {f}")
    print("top inclusive:")
    for f, n in incl.most_common(n_top + 5):
        print(f"  {100 * n / total:5.1f}%  {f}")


if __name__ == "__main__":
    main()
