"""Sum py-spy's collapsed stacks (`--format raw`): the functions with the most samples.

python bench/profile_top.py FILE [N]     self time and total (inclusive) time, top N
"""

from __future__ import annotations

import collections
import sys


def main() -> None:
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    self_time: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            n = int(count)
            samples += n
            frames = stack.split(";")
            self_time[frames[-1]] += n
            for frame in set(frames):
                total[frame] += n
    print(f"{samples} samples")
    print("-- self")
    for frame, n in self_time.most_common(top):
        print(f"{100 * n / samples:5.1f}% {frame}")
    print("-- total")
    for frame, n in total.most_common(top):
        print(f"{100 * n / samples:5.1f}% {frame}")


if __name__ == "__main__":
    main()
