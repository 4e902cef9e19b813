"""Run one scenario in this (fresh) process and print its result as one JSON line.

    python -m benchmarks.worker MODULE FUNCTION '{"param": ...}'

``MODULE`` is relative to ``benchmarks`` (``raw_sqlite``, ``iii_bench``,
``peers.huey_bench``...). The result gets the process's peak RSS.
"""

from __future__ import annotations

import importlib
import json
import logging
import resource
import sys


def main() -> None:
    module, function, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    logging.basicConfig(level=logging.WARNING)
    scenario = getattr(importlib.import_module(f"benchmarks.{module}"), function)
    result = dict(scenario(**params))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
