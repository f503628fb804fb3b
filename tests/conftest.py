import os

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import sys
from pathlib import Path

# the repository root, so that tests (and the ranks they spawn) can import benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
