"""Reading a JSON file a user hands over (a manifest, a training config) without a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def read_json(path: Path, error: Callable[[str], Exception]) -> object:
    """`path`'s JSON value; a file that is not JSON raises `error(message)` naming it: invalid JSON,
    bytes that are not UTF-8, or nesting deeper than the parser recurses."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
