"""Popularity data: how many packages depend on each store path name.

Loaded once at start-up from NIX_POPULARITY_URL (an http(s) URL or a file),
in the original Nixery's format: a JSON object of store path name (without
the hash) to a count. Without it every path is equally popular.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Optional


class PopularityError(Exception):
    pass


def load(url: Optional[str], timeout: float = 30) -> dict[str, int]:
    if not url:
        return {}
    try:
        if url.startswith(("http://", "https://")):
            with urllib.request.urlopen(url, timeout=timeout) as response:
                raw = response.read()
        else:
            with open(url, "rb") as f:
                raw = f.read()
        data = json.loads(raw)
    except (OSError, ValueError) as e:
        raise PopularityError(f"NIX_POPULARITY_URL={url}: cannot load popularity data: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise PopularityError(f"NIX_POPULARITY_URL={url}: expected a JSON object of name -> count")
    return {str(k): int(v) for k, v in data.items()}
