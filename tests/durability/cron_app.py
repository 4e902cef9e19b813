"""The app the cron kill -9 test runs in a child process (not collected by pytest).

argv: STORE_DIR MARKER. A cron job fires every second on a file store; its handler writes
its process id to MARKER and then never returns, so the fire stays running until the
parent kills this process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio

from iii_embedded import III, Config, StoreConfig

store_dir, marker = sys.argv[1:3]
iii = III(Config(store=StoreConfig(store_method="file_based", file_path=store_dir)))


@iii.function("beat", cron="* * * * * *")
async def beat(_: Any) -> None:
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    await anyio.sleep_forever()


async def main() -> None:
    async with iii.running():
        await anyio.sleep_forever()


anyio.run(main)
