"""Debian's Chromium for the browser tests, driven by Playwright (never `playwright install`: it downloads)."""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
# Headless, and none of Chromium's own calls home (this machine has no network; they would only fail).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def launch(playwright):
    """A headless Chromium browser from `sync_playwright()`'s object."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
