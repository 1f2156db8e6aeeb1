#!/usr/bin/env python
"""train.py with every training image NaN from a given batch of epoch 0 on (tests only): the real
command line, launcher handling and one-line failure path, on real ffcv data.

    python tests/poisoned_train.py --nan-from-batch 5 --config ... --opts ...
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dwnet.data  # noqa: E402
from poisoned_loaders import Poisoned  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    flag = argv.index("--nan-from-batch")
    first_bad = int(argv[flag + 1])
    del argv[flag:flag + 2]
    build = dwnet.data.build_train_loader
    # The Trainer imports build_train_loader from dwnet.data when it builds its loaders.
    dwnet.data.build_train_loader = lambda *a, **k: Poisoned(build(*a, **k), bad={}, from_batch=(0, first_bad))
    import train
    from dwnet.distributed import run_and_exit_on_failure

    return run_and_exit_on_failure(train.main, argv)


if __name__ == "__main__":
    sys.exit(main())
