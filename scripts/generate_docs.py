"""Writes the docs that are generated from code: docs/training_arguments.md (xtrainer/args_support.py).

Usage: PYTHONPATH=. python scripts/generate_docs.py   (tests fail when a committed file is out of date)
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xtrainer.args_support import markdown_table  # noqa: E402

if __name__ == "__main__":
    path = os.path.join(ROOT, "docs", "training_arguments.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown_table())
    print(f"wrote {path}")
