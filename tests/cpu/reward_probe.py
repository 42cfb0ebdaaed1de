"""A GRPO reward function for tests: it appends the arguments it was called with to the JSONL file named by
REWARD_PROBE_LOG (read at call time) and rewards longer answers, so the stage's call can be checked."""

from __future__ import annotations

import json
import os
from typing import Any


def longer_is_better(prompts: list[str], completions: list[str], messages: list[list[dict]],
                     **extra: Any) -> list[float]:
    log = os.environ.get("REWARD_PROBE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"prompts": prompts, "completions": completions, "messages": messages,
                                "extra": sorted(extra)}) + "\n")
    return [len(c) / 10.0 for c in completions]


def wrong_count(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    return [0.0]


NOT_CALLABLE = 3


def raises(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    raise KeyError("no label for this prompt")
