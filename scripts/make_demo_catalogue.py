"""Generate the bundled demo catalogue (data/catalogue.csv + images/*.jpg).

Usage: python scripts/make_demo_catalogue.py [--out DIR] [--seed 0] [--n-items 300]
The output is deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # runnable from a checkout without installing the package

from scripts.demo import make_demo_catalogue  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT,
                        help="folder that receives data/ and images/ (default: repository root)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-items", type=int, default=300)
    args = parser.parse_args(argv)
    try:
        csv_path = make_demo_catalogue(args.out, seed=args.seed, n_items=args.n_items)
    except ValueError as exc:  # too few items for the classes
        parser.error(str(exc))
    print(f"wrote {csv_path} ({args.n_items} items)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
