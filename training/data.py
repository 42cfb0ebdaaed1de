"""Rows in, tensors out: reading, format normalisation, chat-template tokenisation and resumable sampling.

Every stage reads its sources with ``load_rows(sources, kind)``: ``"sft"`` gives ``Conversation``s (SFT and
PPO's PTX data), ``"preference"`` gives ``PreferencePair``s (reward model), ``"prompt"`` gives ``Prompt``s (PPO).
The format is detected per row: OpenAI/ShareGPT ``messages``, ColossalChat (``from`` roles, ``context``),
Anthropic HH transcripts, Alpaca and self-instruct seed tasks, and bare prompts. A malformed row raises a
``DataError`` naming the source, line and field, or is skipped and counted with ``on_error="skip"``.

Batches come from ``iterate_batches`` driven by a ``ResumableSampler`` whose ``state_dict()`` after a step
says exactly where the data stream stands, so a resumed run sees the same order as an uninterrupted one.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Kind = Literal["sft", "preference", "prompt"]

IGNORE_INDEX = -100
MAX_REPORTED_ERRORS = 20
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "bot": "assistant"}
_PROMPT_KEYS = ("prompt", "context", "messages")  # where a preference row keeps its prompt, in order of preference
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


class DataError(ValueError):
    """A data source or row is unusable; the message names the source, line (or row index) and field."""

    def __init__(self, message: str, *, source: str, line: int | None = None, field: str | None = None,
                 unit: str = "line") -> None:
        self.source, self.line, self.field = source, line, field
        where = source + (f" {unit} {line}" if line is not None else "")
        super().__init__(f"{where}: " + (f"field '{field}': " if field else "") + message)


class _RowError(Exception):
    """Raised by the parsers; ``load_rows`` adds the source and line and re-raises it as a DataError."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


@dataclass
class Conversation:
    """An SFT (or PTX) example; holds at least one assistant message."""

    messages: list[Message]


@dataclass
class PreferencePair:
    """A prompt ending in a user turn, and the preferred and dispreferred assistant turn(s) after it."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


@dataclass
class Prompt:
    """A PPO prompt: messages ending in a user turn."""

    messages: list[Message]


@dataclass
class LoadStats:
    rows: int = 0  # valid rows kept
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first MAX_REPORTED_ERRORS messages


# ----------------------------------------------------------------------------- reading


def _line_based(source: str) -> bool:
    return source.endswith((".jsonl", ".jsonl.gz"))


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:  # keep "\r" and U+2028 inside strings intact
        return f.read()


def _jsonl(text: str) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line, strict=False)  # strict=False: tolerate raw tabs in strings
        except json.JSONDecodeError as e:
            yield n, _RowError(None, f"invalid JSON: {e.msg} (column {e.colno})")


def _raw_rows(source: str) -> Iterator[tuple[int, Any]]:
    """(line or row index, parsed row or _RowError); problems with the source itself raise DataError."""
    if source.startswith("hf:"):
        import datasets

        name, _, split = source[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"cannot load Hugging Face dataset: {e}", source=source) from e
        yield from enumerate(ds)
        return
    path = Path(source)
    if not path.exists():
        raise DataError("file or folder not found", source=source)
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(f"not a folder written by datasets' save_to_disk: {e}", source=source) from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise DataError(f"dataset has splits {sorted(ds)} and none is 'train'", source=source)
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        yield from enumerate(ds)
        return
    if not source.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        raise DataError("unsupported source; expected .jsonl, .json (optionally .gz), a save_to_disk folder "
                        "or hf:NAME[:SPLIT]", source=source)
    try:
        text = _read_text(path)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read: {e}", source=source) from e
    if _line_based(source):
        yield from _jsonl(text)
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", source=source) from e
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DataError('expected a JSON list of objects or {"data": [...]}', source=source)
    yield from enumerate(doc)


def read_rows(source: str) -> Iterator[tuple[int, dict]]:
    """Yield (number, row): the 1-based line for .jsonl files, else the 0-based row index."""
    unit = "line" if _line_based(source) else "row"
    for n, row in _raw_rows(source):
        if isinstance(row, _RowError):
            raise DataError(row.message, source=source, line=n, field=row.field, unit=unit)
        yield n, row


# ----------------------------------------------------------------------------- parsing


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(row: dict, key: str) -> Any:
    return row.get(key)  # datasets fills missing columns with None, so None means absent


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _RowError(name, f"expected a string, got {_type(value)}")
    if not value.strip():
        raise _RowError(name, "is empty")
    return value


def _messages(value: Any, name: str) -> list[Message]:
    """Validate a message list (OpenAI ``role`` or ColossalChat/ShareGPT ``from``; ``content`` or ``value``)."""
    if not isinstance(value, list):
        raise _RowError(name, f"expected a list of messages, got {_type(value)}")
    if not value:
        raise _RowError(name, "is an empty list")
    out = []
    for i, m in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _RowError(at, f"expected a message object, got {_type(m)}")
        role_key = "role" if _get(m, "role") is not None else "from"
        content_key = "content" if _get(m, "content") is not None else "value"
        role = _get(m, role_key)
        if role is None:
            raise _RowError(at, "missing 'role' (or 'from')")
        if not isinstance(role, str) or role.lower() not in _ROLES:
            raise _RowError(f"{at}.{role_key}", f"unknown role {role!r}; expected system, user or assistant "
                                                "(or human, gpt, bot)")
        out.append({"role": _ROLES[role.lower()], "content": _text(_get(m, content_key), f"{at}.content")})
    return out


def _turns(value: Any, name: str, role: str) -> list[Message]:
    """A string (one ``role`` message) or a message list."""
    if isinstance(value, str):
        return [{"role": role, "content": _text(value, name)}]
    if not isinstance(value, list):
        raise _RowError(name, f"expected a string or a list of messages, got {_type(value)}")
    return _messages(value, name)


def _parse_hh(value: Any, name: str, allow_empty_last: bool = False) -> list[Message]:
    """An Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages.

    Consecutive turns of one speaker (an HH artefact, e.g. a reply split in two) are joined with a blank line.
    """
    if not isinstance(value, str):
        raise _RowError(name, f"expected a string, got {_type(value)}")
    parts = _HH_MARKER.split(value)
    if len(parts) < 3:
        raise _RowError(name, "expected an Anthropic HH transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...'); "
                              "found no 'Human:'/'Assistant:' markers")
    if parts[0].strip():
        raise _RowError(name, "text before the first 'Human:'/'Assistant:' marker")
    out: list[Message] = []
    turns = list(zip(parts[1::2], parts[2::2], strict=True))
    for i, (speaker, content) in enumerate(turns):
        content = content.strip()
        if not content and not (allow_empty_last and i == len(turns) - 1):
            raise _RowError(name, f"{speaker} turn {i + 1} of {len(turns)} is empty")
        role = "user" if speaker == "Human" else "assistant"
        if out and out[-1]["role"] == role:
            out[-1]["content"] = (out[-1]["content"] + "\n\n" + content).strip()
        else:
            out.append({"role": role, "content": content})
    return out


def _dialogue(value: Any, name: str, allow_empty_last: bool = False) -> list[Message]:
    """A whole dialogue: an HH transcript string or a message list."""
    return _parse_hh(value, name, allow_empty_last) if isinstance(value, str) else _messages(value, name)


def _split_last_reply(msgs: list[Message], name: str) -> tuple[list[Message], list[Message]]:
    """(prompt, final assistant turn(s)) of a whole dialogue."""
    start = len(msgs)
    while start > 0 and msgs[start - 1]["role"] == "assistant":
        start -= 1
    if start == len(msgs):
        raise _RowError(name, f"does not end with an assistant turn (ends with {msgs[-1]['role']})")
    _check_prompt(msgs[:start], name)
    return msgs[:start], msgs[start:]


def _check_prompt(msgs: list[Message], name: str) -> list[Message]:
    if not msgs:
        raise _RowError(name, "has no user turn before the assistant's")
    if msgs[-1]["role"] != "user":
        raise _RowError(f"{name}[{len(msgs) - 1}].role", f"a prompt must end with a user message, "
                                                         f"got {msgs[-1]['role']!r}")
    return msgs


def _alpaca_user(row: dict) -> str:
    instruction = _text(_get(row, "instruction"), "instruction")
    extra = _get(row, "input")
    if extra is not None and not isinstance(extra, str):
        raise _RowError("input", f"expected a string, got {_type(extra)}")
    return instruction + ("\n\n" + extra if extra and extra.strip() else "")


def _prompt_key(row: dict) -> str | None:
    return next((k for k in _PROMPT_KEYS if _get(row, k) is not None), None)


def _keys(row: dict) -> str:
    return ", ".join(map(str, row)) or "none"


def parse_conversation(row: dict) -> Conversation:
    """An SFT row: messages, Alpaca, a self-instruct seed task, or the chosen side of a preference row."""
    if _get(row, "chosen") is not None:
        pk = _prompt_key(row)
        if pk is None:  # a whole dialogue, e.g. an HH transcript
            msgs = _dialogue(row["chosen"], "chosen")
        else:
            msgs = _check_prompt(_turns(row[pk], pk, "user"), pk) + _turns(row["chosen"], "chosen", "assistant")
    elif _get(row, "messages") is not None or _get(row, "conversations") is not None:
        key = "messages" if _get(row, "messages") is not None else "conversations"
        msgs = _messages(row[key], key)
    elif _get(row, "instruction") is not None:
        user = _alpaca_user(row)
        if _get(row, "output") is not None:
            answer = _text(row["output"], "output")
        elif _get(row, "instances") is not None:
            inst = row["instances"]
            if not isinstance(inst, list) or not inst or not isinstance(inst[0], dict):
                raise _RowError("instances", f"expected a non-empty list of {{input, output}}, got {_type(inst)}")
            user = _alpaca_user({"instruction": row["instruction"], "input": _get(inst[0], "input")})
            answer = _text(_get(inst[0], "output"), "instances[0].output")
        else:
            raise _RowError("output", "missing: an SFT row needs an answer ('output' or 'instances')")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    elif _get(row, "prompt") is not None:
        raise _RowError("output", "missing: an SFT row needs an answer, this row has only a 'prompt'")
    else:
        raise _RowError(None, f"unrecognised SFT row (keys: {_keys(row)}); expected 'messages', "
                              "'instruction' + 'output', or 'chosen' (a preference row)")
    if not any(m["role"] == "assistant" for m in msgs):
        raise _RowError("messages", "has no assistant message")
    return Conversation(msgs)


def parse_preference(row: dict) -> PreferencePair:
    """A preference row: prompt/context/messages + chosen/rejected, or whole dialogues such as HH transcripts."""
    if _get(row, "chosen") is None or _get(row, "rejected") is None:
        missing = "chosen" if _get(row, "chosen") is None else "rejected"
        raise _RowError(missing, f"missing (keys: {_keys(row)}); a preference row needs 'chosen' and 'rejected', "
                                 "with 'prompt', 'context' or 'messages', or both as whole dialogues")
    pk = _prompt_key(row)
    if pk is None:  # whole dialogues: shared prompt, then each side's final assistant turn (prompt from chosen)
        prompt, chosen = _split_last_reply(_dialogue(row["chosen"], "chosen"), "chosen")
        _, rejected = _split_last_reply(_dialogue(row["rejected"], "rejected"), "rejected")
        return PreferencePair(prompt, chosen, rejected)
    prompt = _check_prompt(_turns(row[pk], pk, "user"), pk)
    sides = []
    for side in ("chosen", "rejected"):
        msgs = _turns(row[side], side, "assistant")
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                raise _RowError(f"{side}[{i}].role", f"expected 'assistant' after the prompt, got {m['role']!r}")
        sides.append(msgs)
    return PreferencePair(prompt, sides[0], sides[1])


def parse_prompt(row: dict) -> Prompt:
    """A PPO prompt: messages/context, instruction (+input), prompt, or a preference row's dialogue before its reply."""
    if _get(row, "chosen") is not None:
        pk = _prompt_key(row)
        if pk is not None:
            return Prompt(_check_prompt(_turns(row[pk], pk, "user"), pk))
        msgs = _dialogue(row["chosen"], "chosen", allow_empty_last=True)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return Prompt(_check_prompt(msgs, "chosen"))
    for key in ("messages", "context", "conversations"):
        if _get(row, key) is not None:
            return Prompt(_check_prompt(_messages(row[key], key), key))
    if _get(row, "instruction") is not None:
        return Prompt([{"role": "user", "content": _alpaca_user(row)}])
    if _get(row, "prompt") is not None:
        return Prompt(_check_prompt(_turns(row["prompt"], "prompt", "user"), "prompt"))
    raise _RowError(None, f"unrecognised prompt row (keys: {_keys(row)}); expected 'messages', 'context', "
                          "'instruction', 'prompt' or 'chosen'")


_PARSERS: dict[str, Callable[[dict], Any]] = {
    "sft": parse_conversation, "preference": parse_preference, "prompt": parse_prompt}


def load_rows(sources: list[str], kind: Kind, on_error: Literal["raise", "skip"] = "raise",
              max_samples: int | None = None) -> tuple[list, LoadStats]:
    """Parse every row of ``sources`` as ``kind``; stop after ``max_samples`` valid rows."""
    if kind not in _PARSERS:
        raise ValueError(f"kind must be one of {sorted(_PARSERS)}, got {kind!r}")
    parse, items, stats = _PARSERS[kind], [], LoadStats()
    for source in sources:
        unit = "line" if _line_based(source) else "row"
        for n, row in _raw_rows(source):
            try:
                if isinstance(row, _RowError):
                    raise row
                if not isinstance(row, dict):
                    raise _RowError(None, f"expected a JSON object, got {_type(row)}")
                items.append(parse(row))
            except _RowError as e:
                err = DataError(e.message, source=source, line=n, field=e.field, unit=unit)
                if on_error == "raise":
                    raise err from None
                stats.skipped += 1
                if len(stats.errors) < MAX_REPORTED_ERRORS:
                    stats.errors.append(str(err))
            if max_samples is not None and len(items) >= max_samples:
                break
        if max_samples is not None and len(items) >= max_samples:
            break
    stats.rows = len(items)
    if not items:
        raise DataError(f"no valid {kind} rows ({stats.skipped} malformed); first error: "
                        f"{stats.errors[0] if stats.errors else 'none, the sources are empty'}",
                        source=", ".join(sources))
    return items, stats


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded ``fraction`` of items held out (at least one when fraction > 0); order kept."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or len(items) < 2:
        return list(items), []
    n_eval = min(max(1, round(len(items) * fraction)), len(items) - 1)
    g = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(len(items), generator=g)[:n_eval].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# ----------------------------------------------------------------------------- tokenisation


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, override: str | None = None) -> None:
    """Install ``override`` (or DEFAULT_CHAT_TEMPLATE if the tokenizer has none) and a pad token."""
    if override is not None:
        tokenizer.chat_template = override
    elif tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError("tokenizer has neither a pad nor an eos token", source="tokenizer")
        tokenizer.pad_token = tokenizer.eos_token


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not tokenizer.is_fast:
        raise DataError("a fast tokenizer is needed (character offsets)", source="tokenizer")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # templates add BOS themselves
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def _not_prefix(what: str) -> DataError:
    return DataError(f"the chat template is not prefix-consistent ({what}), so assistant tokens cannot be located; "
                     "set model.chat_template to a template that renders each turn independently",
                     source="chat template")


def tokenize_conversation(conv: Conversation, tokenizer: PreTrainedTokenizerBase,
                          max_length: int) -> dict[str, list[int]] | None:
    """input_ids and labels (-100 except assistant contents and their end-of-turn text); None if none fit."""
    msgs = conv.messages
    text = _render(tokenizer, msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, msgs[:i], generation_prompt=True)
        upto = _render(tokenizer, msgs[: i + 1])
        if not upto.startswith(before) or not text.startswith(upto):
            raise _not_prefix(f"rendering of messages[:{i + 1}] does not extend the previous turns")
        spans.append((len(before), max(len(before), len(upto.rstrip()))))  # not the newline after the end marker
    ids, offsets = _encode(tokenizer, text)
    labels = [t if any(s < end and e > start for start, end in spans) else IGNORE_INDEX
              for t, (s, e) in zip(ids, offsets, strict=True)]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def _prompt_split(tokenizer: PreTrainedTokenizerBase, prompt_text: str, full: list[Message]) -> tuple[list, list]:
    text = _render(tokenizer, full)
    if not text.startswith(prompt_text):
        raise _not_prefix("the prompt with a generation prompt is not a prefix of prompt + reply")
    ids, offsets = _encode(tokenizer, text)
    k = sum(1 for s, _ in offsets if s < len(prompt_text))
    return ids[:k], ids[k:]


def tokenize_preference(pair: PreferencePair, tokenizer: PreTrainedTokenizerBase,
                        max_length: int) -> dict[str, list[int]] | None:
    """chosen/rejected input_ids and how many of their first tokens are prompt (``*_prompt_len``, for DPO's
    response-only log-probs); an over-long prompt loses its start first (down to half of max_length), then
    sequences are cut at max_length. None if chosen and rejected become identical or lose their whole reply."""
    prompt_text = _render(tokenizer, pair.prompt, generation_prompt=True)
    c_prompt, c_reply = _prompt_split(tokenizer, prompt_text, pair.prompt + pair.chosen)
    r_prompt, r_reply = _prompt_split(tokenizer, prompt_text, pair.prompt + pair.rejected)
    cap = max(max_length - max(len(c_reply), len(r_reply)), max_length // 2)  # prompt tokens kept at most
    kc, kr = min(len(c_prompt), cap), min(len(r_prompt), cap)
    chosen = (c_prompt[len(c_prompt) - kc:] + c_reply)[:max_length]
    rejected = (r_prompt[len(r_prompt) - kr:] + r_reply)[:max_length]
    if len(chosen) <= kc or len(rejected) <= kr or chosen == rejected:
        return None
    return {"chosen_input_ids": chosen, "rejected_input_ids": rejected, "chosen_prompt_len": kc,
            "rejected_prompt_len": kr}


def tokenize_prompt(prompt: Prompt, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[int]:
    """The prompt with the assistant generation prompt; its last ``max_length`` tokens."""
    ids, _ = _encode(tokenizer, _render(tokenizer, prompt.messages, generation_prompt=True))
    return ids[-max_length:]


def eos_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end a sampled answer: the tokenizer's EOS, plus ChatML's end of turn when the vocabulary has it
    (SmolLM2's EOS is <|endoftext|>, but its chat turns end with <|im_end|>)."""
    extra = [tokenizer.convert_tokens_to_ids("<|im_end|>")] if "<|im_end|>" in tokenizer.get_vocab() else []
    return sorted({tokenizer.eos_token_id, *extra} - {None})


# ----------------------------------------------------------------------------- batching


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> Tensor:
    width = max(len(s) for s in seqs)
    rows = [[value] * (width - len(s)) + s if left else s + [value] * (width - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def _mask(seqs: list[list[int]], left: bool = False) -> Tensor:
    return _pad([[1] * len(s) for s in seqs], 0, left)


def collate_sft(batch: list[dict], pad_id: int) -> dict[str, Tensor]:
    ids = [b["input_ids"] for b in batch]
    return {"input_ids": _pad(ids, pad_id), "attention_mask": _mask(ids),
            "labels": _pad([b["labels"] for b in batch], IGNORE_INDEX)}


def collate_preference(batch: list[dict], pad_id: int) -> dict[str, Tensor]:
    out = {}
    for side in ("chosen", "rejected"):
        ids = [b[f"{side}_input_ids"] for b in batch]
        out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = _pad(ids, pad_id), _mask(ids)
    return out


def collate_dpo(batch: list[dict], pad_id: int) -> dict[str, Tensor]:
    """``collate_preference`` plus each side's response mask (1 on reply tokens) and, when the examples carry them,
    the reference's precomputed sequence log-probs (``ref_chosen_logp``, ``ref_rejected_logp``)."""
    out = collate_preference(batch, pad_id)
    for side in ("chosen", "rejected"):
        rows = [[0] * b[f"{side}_prompt_len"] + [1] * (len(b[f"{side}_input_ids"]) - b[f"{side}_prompt_len"])
                for b in batch]
        out[f"{side}_loss_mask"] = _pad(rows, 0)
        key = f"ref_{side}_logp"
        if all(key in b for b in batch):
            out[key] = torch.tensor([b[key] for b in batch], dtype=torch.float32)
    return out


def collate_prompts(batch: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Left-padded, so every prompt ends where generation starts."""
    return {"input_ids": _pad(batch, pad_id, left=True), "attention_mask": _mask(batch, left=True)}


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A seeded, distributed, epoch-aware sampler whose ``position`` counts the samples handed out this epoch.

    Each epoch permutes ``range(num_samples)`` with seed ``seed + epoch``, cuts it to the same count for every
    rank (``num_samples // world_size`` rounded down to whole batches, at least one batch, repeating indices
    if the data is smaller) and gives rank r ``indices[r::world_size]``. Iteration starts at ``position``.

    ``position`` advances as indices are yielded, so it is exact with ``iterate_batches`` or a DataLoader with
    ``num_workers=0``; with ``num_workers > 0`` the DataLoader prefetches and position runs ahead of training.
    """

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 batch_size: int = 1) -> None:
        if num_samples < 1 or world_size < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler shape: num_samples={num_samples} rank={rank} world_size={world_size} "
                             f"batch_size={batch_size}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.shuffle, self.seed, self.batch_size = shuffle, seed, batch_size
        self.per_rank = max(num_samples // world_size // batch_size, 1) * batch_size
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.per_rank

    def indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``."""
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
            order = order.tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        order = (order * -(-total // self.num_samples))[:total]
        return order[self.rank::self.world_size]

    def _roll_over(self) -> None:
        if self.position >= self.per_rank:
            self.epoch, self.position = self.epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        self._roll_over()
        indices = self.indices(self.epoch)
        while self.position < len(indices):
            self.position += 1  # before yielding: the consumer holds the index once position counts it
            yield indices[self.position - 1]
        self._roll_over()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_samples", "world_size"):
            if state[key] != getattr(self, key):
                raise DataError(f"dataset changed since the checkpoint: {key} was {state[key]}, "
                                f"now {getattr(self, key)}", source="sampler state")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


def iterate_batches(dataset: list, sampler: ResumableSampler, batch_size: int,
                    collate: Callable[[list], dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    """Collated batches forever, across epochs; ``sampler.position`` counts exactly the batches yielded."""
    if batch_size != sampler.batch_size:
        raise ValueError(f"batch_size {batch_size} differs from the sampler's {sampler.batch_size}")
    while True:
        sampler._roll_over()
        indices = sampler.indices(sampler.epoch)
        while sampler.position + batch_size <= len(indices):
            start = sampler.position
            batch = collate([dataset[i] for i in indices[start:start + batch_size]])
            sampler.position = start + batch_size
            yield batch
