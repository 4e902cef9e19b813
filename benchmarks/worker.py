"""Run one scenario in this process and print its result as one JSON line.

python -m benchmarks.worker MODULE FUNCTION '{"param": ...}'
"""

from __future__ import annotations

import importlib
import json
import resource
import sys


def main() -> None:
    module, function, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    result = getattr(importlib.import_module(f"benchmarks.{module}"), function)(**params)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


if __name__ == "__main__":
    main()
