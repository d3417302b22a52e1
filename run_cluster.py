"""`python run_cluster.py [--config FILE] [--only s1,s2] [--fresh]`: start every server of a configuration
and supervise them (the checkout's `chatmesh-cluster`; see node/run_cluster.py). Paths default to this
checkout: its configuration.txt, data/ and .cluster-secret."""

from __future__ import annotations

import sys
from pathlib import Path

from node.run_cluster import main

if __name__ == "__main__":
    sys.exit(main(base=Path(__file__).resolve().parent, prog="run_cluster"))
