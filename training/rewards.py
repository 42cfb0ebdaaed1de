"""Rule-based (verifiable) rewards for GRPO, and the arithmetic task they verify.

A reward function takes keyword arguments and returns one float per completion (see ``RewardSpec`` in
training/config.py)::

    fn(prompts: list[str], completions: list[str], messages: list[list[dict]]) -> list[float]

``prompts`` are each sample's last user message, ``completions`` the sampled answers (special tokens removed),
``messages`` the whole prompt conversations. Accept ``**kwargs`` so later arguments do not break a function.

The arithmetic task (``training/demo_data/arithmetic_{train,eval}.jsonl``, written by ``arithmetic_rows``) asks
"What is A + B?" or "What is A - B?" and asks for the reply to end with ``Answer: N``. The question carries
everything needed to check an answer, so the reward needs no label column. ``arithmetic_correct`` checks the
reply's final number: SmolLM2-135M-Instruct answers "17 + 39 = 56." and, greedy on the first 32 eval prompts
of the first version of the task (operands up to 50; CPU, 48 new tokens), got 9 of 32 right that way but never used
the ``Answer:`` line (1 of 32 samples at temperature 1 did), so a strict check would give GRPO groups of zeros,
nothing to learn from. ``answer_format``
rewards the requested format separately:

    grpo.rewards: [{function: training.rewards:arithmetic_correct, weight: 1.0},
                   {function: training.rewards:answer_format, weight: 0.2}]

Regenerate the shipped files with ``python -m training.rewards training/demo_data``.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any

INSTRUCTION = "Reply with the result on the last line as 'Answer: <number>'."
_QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?")
_ANSWER = re.compile(r"Answer:\s*(-?\d+)\s*\.?\s*$")
_NUMBER = re.compile(r"-?\d+")
TRAIN_ROWS, EVAL_ROWS = 512, 64
# Operands up to 20, not 50: SmolLM2-135M-Instruct sampled at temperature 0.7 (8 answers to each of 12 questions, CPU,
# 48 new tokens) was right 8% of the time with operands up to 50 and 58% of the GRPO groups scored all alike (no
# signal; 3% right and 67% at temperature 1.0); with operands up to 20, 26% right and 25% such groups (greedy 50%).
MAX_OPERAND = 20


def _question(prompt: str) -> tuple[int, str, int] | None:
    m = _QUESTION.search(prompt)
    return (int(m.group(1)), m.group(2), int(m.group(3))) if m else None


def question_answer(prompt: str) -> int | None:
    """The true result of the prompt's "What is A op B?", or None if it asks no such question."""
    q = _question(prompt)
    if q is None:
        return None
    a, op, b = q
    return a + b if op == "+" else a - b


def stated_answer(completion: str) -> int | None:
    """The number after a final ``Answer:``, or None if the reply does not end that way."""
    m = _ANSWER.search(completion.strip())
    return int(m.group(1)) if m else None


def final_number(completion: str, prompt: str = "") -> int | None:
    """The last integer of the reply once the question's own "A op B" is taken out (so "What is 10 - 5?" repeated
    back does not count as answering 5); None if no number is left."""
    q = _question(prompt)
    if q is not None:
        completion = re.sub(rf"{q[0]}\s*[{q[1]}]\s*{q[2]}", " ", completion)
    found = _NUMBER.findall(completion)
    return int(found[-1]) if found else None


def arithmetic_correct(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 where the reply's final number is the question's result, else 0.0 (also for prompts that ask no
    arithmetic question). Its mean over held-out prompts is the task's pass rate."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        truth = question_answer(prompt)
        out.append(float(truth is not None and final_number(completion, prompt) == truth))
    return out


def answer_format(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 where the reply ends with ``Answer: <integer>``, right or wrong: a denser signal than correctness."""
    return [float(stated_answer(c) is not None) for c in completions]


def arithmetic_rows(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """``n`` prompt rows, additions and subtractions of numbers 1..``MAX_OPERAND`` with non-negative results, none
    of them in ``exclude``."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        prompt = f"What is {a} {op} {b}? {INSTRUCTION}"
        if prompt not in exclude:
            rows.append({"prompt": prompt})
    return rows


def write_task(folder: Path) -> list[Path]:
    """The shipped train and eval files; no eval question is in the training file (with operands up to 20 there
    are only ~630 distinct questions, so different seeds alone would repeat many)."""
    held = arithmetic_rows(EVAL_ROWS, seed=2)
    train = arithmetic_rows(TRAIN_ROWS, seed=1, exclude=frozenset(r["prompt"] for r in held))
    out = []
    for name, rows in (("arithmetic_train.jsonl", train), ("arithmetic_eval.jsonl", held)):
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_task(Path(sys.argv[1] if len(sys.argv) > 1 else "training/demo_data")):
        print(p)
