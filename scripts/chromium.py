"""The browser the screenshots and the browser tests drive: Debian's chromium under Playwright.

Playwright's own browser downloads are not used (`playwright install` needs the network); `apt-get install chromium`
provides the binary, and these flags let it run headless as root in a container.
"""

from __future__ import annotations

import os
from pathlib import Path

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}  # the README's screenshots are this wide
