"""Where rgchat keeps its models: platformdirs' user data folder, or $RGCHAT_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def store_dir() -> Path:
    return Path(os.environ.get("RGCHAT_HOME") or platformdirs.user_data_dir("rgchat"))
