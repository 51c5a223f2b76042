"""Where the package's data lives and where it caches exports (no heavy imports, so any layer may use it)."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent
BUNDLED_MODEL_DIR = PACKAGE_DIR / "assets" / "minimind-tiny"
CORPUS_DIR = PACKAGE_DIR / "corpus"
WEB_DIR = PACKAGE_DIR / "web"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minimind-course"
