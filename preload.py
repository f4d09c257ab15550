"""Command-line options, added by the WebUI before it parses its arguments (`script_loading.preload_extensions`).

Values appear on `shared.cmd_opts`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def preload(parser: argparse.ArgumentParser) -> None:
    """Add `--lora-trainer-datasets-dir`."""
    # No default here: the host resolves a missing value to <--data-dir>/datasets, beside models/ and
    # outputs/ (a value here would need the WebUI's paths, and the option is absent when the extension was
    # installed without a restart).
    parser.add_argument("--lora-trainer-datasets-dir", type=_absolute_path, default=None,
                        help="folder the Train LoRA tab lists datasets from (default: 'datasets' in the WebUI's "
                             "data folder, --data-dir)")


def _absolute_path(value: str) -> str:
    return str(Path(value).expanduser().absolute())
