"""Prompt sources: a file (JSONL/JSON/text), a folder of JSONL files (e.g. ``../shared/data/instructionwild``),
or synthetic prompts of a set input length."""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path
from typing import Any

from loadtest.client import Prompt

TEXT_FIELDS = ("instruction", "prompt", "question", "text", "input", "query")
# Common English words; each is one token in Llama/GPT-2-style BPE vocabularies when preceded by a space.
_WORDS = ("the of and to in is was for on are with as by at be this from that have or had not but what all were "
          "when we there can an your which their said if do will each about how up out them then she many some so "
          "these would other into has more her two like him see time could no make than first been its who now "
          "people my made over did down only way find use may water long little very after words called just where "
          "most know get through back much before go good new write our used me man too any day same right look "
          "think also around another came come work three word must because does part even place well such").split()


class PromptError(ValueError):
    """A prompt source that cannot be used; the message names the file and field."""


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _row_prompt(row: Any, where: str, field: str | None) -> tuple[str, list[dict[str, str]] | None]:
    if isinstance(row, str):
        return row, None
    if not isinstance(row, dict):
        raise PromptError(f"{where}: expected an object or a string, got {type(row).__name__}")
    if field:
        if not isinstance(row.get(field), str):
            raise PromptError(f"{where}: field {field!r} missing or not a string")
        return row[field], None
    msgs = row.get("messages") or row.get("conversations")
    if isinstance(msgs, list) and msgs:
        if not all(isinstance(m, dict) and "content" in m for m in msgs):
            raise PromptError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        msgs = [{"role": m.get("role", "user"), "content": str(m["content"])} for m in msgs]
        if msgs[-1]["role"] == "assistant":  # a finished dialogue: ask for the last answer again
            msgs = msgs[:-1]
        if msgs:
            return msgs[-1]["content"], msgs
    for key in TEXT_FIELDS:
        if isinstance(row.get(key), str) and row[key].strip():
            text = row[key]
            if key == "instruction" and isinstance(row.get("input"), str) and row["input"].strip():
                text = f"{text}\n\n{row['input']}"
            return text, None
    raise PromptError(f"{where}: no prompt field; expected one of {', '.join(('messages',) + TEXT_FIELDS)} "
                      "(or pass --prompt-field)")


def load_prompt_file(path: Path, field: str | None = None) -> list[tuple[str, list[dict[str, str]] | None]]:
    """Rows of a ``.jsonl``/``.json``(``.gz``) file, or lines of a ``.txt`` file."""
    name = path.name.removesuffix(".gz")
    rows: list[tuple[str, list[dict[str, str]] | None]] = []
    with _open(path) as f:
        if name.endswith(".txt"):
            return [(line.rstrip("\n"), None) for line in f if line.strip()]
        if name.endswith(".json"):
            data = json.load(f)
            if isinstance(data, dict):
                data = data.get("data") or data.get("prompts") or list(data.values())
            if not isinstance(data, list):
                raise PromptError(f"{path}: expected a list of prompts")
            return [_row_prompt(r, f"{path}[{i}]", field) for i, r in enumerate(data)]
        bad: list[str] = []
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # real exports hold the odd broken line: skip it, but not most of the file
                bad.append(f"{path}:{i}: not JSON ({e})")
                continue
            rows.append(_row_prompt(row, f"{path}:{i}", field))
    if bad and len(bad) >= len(rows):
        raise PromptError(bad[0] + f" (and {len(bad) - 1} more bad lines)")
    if bad:
        print(f"warning: skipped {len(bad)} unparseable line(s), first: {bad[0]}", file=sys.stderr)
    return rows


def load_prompts(source: str, max_tokens: int, field: str | None = None, limit: int | None = None,
                 seed: int = 0) -> list[Prompt]:
    """Prompts from a file or every ``*.jsonl``/``*.json``/``*.txt`` (``.gz``) file of a folder, shuffled."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.removesuffix(".gz").endswith((".jsonl", ".json", ".txt")))
        if not files:
            raise PromptError(f"{path}: no .jsonl/.json/.txt files")
    elif path.is_file():
        files = [path]
    else:
        raise PromptError(f"--prompts {source}: no such file or folder")
    rows = [r for f in files for r in load_prompt_file(f, field)]
    rows = [(t, m) for t, m in rows if t.strip()]
    if not rows:
        raise PromptError(f"{source}: no prompts")
    random.Random(seed).shuffle(rows)
    if limit:
        rows = rows[:limit]
    return [Prompt(text=t, messages=m, max_tokens=max_tokens) for t, m in rows]


def synthetic_prompts(n: int, input_tokens: int, max_tokens: int, tokenizer: str | None = None,
                      seed: int = 0) -> list[Prompt]:
    """``n`` prompts of random common words. With ``tokenizer`` (a folder for ``AutoTokenizer``) each is cut to
    exactly ``input_tokens`` tokens; without one, one word is counted as one token (close for BPE vocabularies;
    the server's ``usage.prompt_tokens`` reports the real length)."""
    rng = random.Random(seed)
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    prompts = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(input_tokens)]
        text = " ".join(words)
        known = None
        if tok is not None:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            while len(ids) < input_tokens:
                ids += tok(" " + " ".join(rng.choice(_WORDS) for _ in range(input_tokens)),
                           add_special_tokens=False)["input_ids"]
            text = tok.decode(ids[:input_tokens])
            known = input_tokens
        prompts.append(Prompt(text=text, max_tokens=max_tokens, input_tokens=known))
    return prompts
