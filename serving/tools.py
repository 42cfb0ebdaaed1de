"""Tool calling: ``tools`` and tool history into the prompt, generated text back into OpenAI ``tool_calls``.

Rendering: a chat template that knows tools (its source mentions ``tools``) gets them the Hugging Face way
(``apply_chat_template(messages, tools=...)``, assistant ``tool_calls`` with their arguments as objects, ``role:
tool`` messages as they are). Every other template (the tiny test model's ChatML, SmolLM2-135M-Instruct's) gets
``FALLBACK_PROMPT``: the tools as JSON schemas in the system message, calls written as ``<tool_call>{"name": ...,
"arguments": {...}}</tool_call>`` (the Hermes / Qwen convention many open models are tuned on), tool results
sent back as a user turn in ``<tool_response>`` tags.

Parsing reads two forms: bare JSON (``{"name", "arguments"}`` or an array of them: what a forced ``tool_choice``
generates under the grammar of ``serving.structured.tool_call_schema``) and ``<tool_call>`` blocks (what a model
writes on its own under ``auto``). ``ToolCallStreamParser`` does the same incrementally, as OpenAI streams calls:
one delta with ``index``, ``id``, ``type`` and ``function.name`` (arguments ""), then argument text deltas.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
FALLBACK_PROMPT = """# Tools

You may call one or more functions to help with the user's request. The functions are described by these JSON \
schemas:
<tools>
{tools}
</tools>

To call a function, reply with one JSON object per call inside <tool_call></tool_call> tags:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-json-object>}}
</tool_call>
Function results come back in a user message inside <tool_response></tool_response> tags."""
FORCED_SUFFIX = "\n\nYou must call {which} now."
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def template_supports_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def _arguments_obj(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def render_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, template: str | None,
                    forced: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages (OpenAI dicts: role, content, tool_calls, tool_call_id, name) and ``apply_chat_template``
    keyword arguments for ``template``. ``tools`` None: no tools in the prompt (also ``tool_choice: none``).
    ``forced``: the name of the function the answer must call, or "any" (``required``)."""
    if template_supports_tools(template):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"],
                                                      "arguments": _arguments_obj(c["function"]["arguments"])}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = [f"{TOOL_CALL_OPEN}\n" + json.dumps({"name": c["function"]["name"], "arguments":
                                                          _arguments_obj(c["function"]["arguments"])})
                      + f"\n{TOOL_CALL_CLOSE}" for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join([content, *blocks] if content else blocks)})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if tools:
        prompt = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        if forced:
            prompt += FORCED_SUFFIX.format(which="a function" if forced == "any" else f"the function {forced}")
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _call(name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def _as_calls(value: Any, names: set[str]) -> list[dict[str, Any]] | None:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(x, dict) and isinstance(x.get("name"), str) and x["name"] in names
                            and isinstance(x.get("arguments", {}), dict) for x in items):
        return None
    return [_call(x["name"], x.get("arguments", {})) for x in items]


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) from generated text; calls naming a function not in ``names`` stay content."""
    stripped = text.strip()
    if stripped[:1] in "{[":
        try:
            calls = _as_calls(json.loads(stripped), names)
        except json.JSONDecodeError:
            calls = None
        if calls:
            return None, calls
    calls, spans = [], []
    for m in re.finditer(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + "|$)", text, re.S):
        try:
            got = _as_calls(json.loads(m.group(1).strip()), names)
        except json.JSONDecodeError:
            got = None
        if got:
            calls += got
            spans.append(m.span())
    if not calls:
        return text, []
    rest = text
    for a, b in reversed(spans):
        rest = rest[:a] + rest[b:]
    return (rest.strip() or None), calls


class ToolCallStreamParser:
    """Incremental ``parse_tool_calls``: ``feed(text)`` and ``finish()`` return delta dicts to send, each either
    ``{"content": str}`` or ``{"tool_calls": [{"index", "id"?, "type"?, "function": {"name"?, "arguments"}}]}``.

    ``forced``: the output is bare JSON calls (a forced ``tool_choice``); otherwise content streams until a
    ``<tool_call>`` tag opens (a possible tag prefix is held back) and calls are read from there on."""

    def __init__(self, names: set[str], forced: bool):
        self.names = names
        self.in_calls = forced
        self.text = ""  # call region text (everything after the first tag, or all of it when forced)
        self.pos = 0  # next char of self.text to read
        self.state = "seek"  # seek -> head -> args -> close -> seek ...
        self.start = 0  # where the current call object starts
        self.depth, self.in_str, self.esc = 0, False, False
        self.held = ""  # content that may be the start of a tag
        self.calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.in_calls:
            buf = self.held + text
            i = buf.find(TOOL_CALL_OPEN)
            if i < 0:
                keep = next((k for k in range(min(len(buf), len(TOOL_CALL_OPEN) - 1), 0, -1)
                             if TOOL_CALL_OPEN.startswith(buf[-k:])), 0)
                self.held = buf[len(buf) - keep:]
                if buf[:len(buf) - keep]:
                    out.append({"content": buf[:len(buf) - keep]})
                return out
            if buf[:i]:
                out.append({"content": buf[:i]})
            self.in_calls, self.held, text = True, "", buf[i + len(TOOL_CALL_OPEN):]
        self.text += text
        out += self._scan()
        return out

    def finish(self) -> list[dict[str, Any]]:
        if not self.in_calls and self.held:
            held, self.held = self.held, ""
            return [{"content": held}]
        return []

    def _delta(self, **function: Any) -> dict[str, Any]:
        item: dict[str, Any] = {"index": self.calls - 1, "function": function}
        if "name" in function:
            item = {"index": self.calls - 1, "id": new_call_id(), "type": "function", "function": function}
        return {"tool_calls": [item]}

    def _scan(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        t = self.text
        while self.pos < len(t):
            if self.state == "seek":
                j = t.find("{", self.pos)
                if j < 0:
                    self.pos = len(t)
                    break
                self.start, self.pos, self.state = j, j, "head"
                self.depth, self.in_str, self.esc = 0, False, False
            elif self.state == "head":
                m = _HEAD.match(t, self.start)
                if m and m.group(1) in self.names:
                    self.calls += 1
                    out.append(self._delta(name=json.loads(f'"{m.group(1)}"'), arguments=""))
                    self.pos, self.state = m.end(), "args"
                    self.depth, self.in_str, self.esc = 0, False, False
                    continue
                end = self._balance(t)
                if end is None:
                    break  # wait for more text (or a complete object in another key order)
                try:  # a whole object that did not stream (e.g. "arguments" first): one delta pair
                    calls = _as_calls(json.loads(t[self.start:end]), self.names) or []
                except json.JSONDecodeError:
                    calls = []
                for c in calls:
                    self.calls += 1
                    out.append(self._delta(name=c["function"]["name"], arguments=""))
                    out.append(self._delta(arguments=c["function"]["arguments"]))
                self.pos, self.state = end, "seek"
            elif self.state == "args":  # stream the arguments value's text until it balances
                if self.depth == 0:
                    while self.pos < len(t) and t[self.pos] in " \n\t":
                        self.pos += 1
                begin = self.pos
                end = self._balance(t)
                piece = t[begin:end if end is not None else len(t)]
                if piece:
                    out.append(self._delta(arguments=piece))
                if end is None:
                    break
                self.state = "close"
            else:  # close: skip to the call object's own closing brace
                close = t.find("}", self.pos)
                if close < 0:
                    self.pos = len(t)
                    break
                self.pos, self.state = close + 1, "seek"
        return out

    def _balance(self, t: str) -> int | None:
        """Scan a JSON value on from ``self.pos`` (string/depth state kept across feeds); moves ``self.pos`` to
        where it stopped and returns it once the value's last bracket closes, else None (more text needed)."""
        i = self.pos
        while i < len(t):
            c = t[i]
            i += 1
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.pos = i
                    return i
        self.pos = i
        return None
