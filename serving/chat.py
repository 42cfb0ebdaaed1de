"""Chat with a running server from the terminal: streaming, multi-turn, with the official ``openai`` client.

    python -m serving.chat --url http://127.0.0.1:8000                 # interactive
    python -m serving.chat --url http://127.0.0.1:8000 --once "Hello"  # one reply, then exit
    echo "What is 2+2?" | python -m serving.chat --url ...             # one reply per input line

Commands inside the chat: /reset, /system TEXT, /model NAME, /models, /temperature X, /top_p X,
/max_tokens N, /history, /help, /quit. Ctrl-C stops the reply being written; Ctrl-D quits.
The API key comes from --api-key or $OPENAI_API_KEY (only needed when the server sets API_KEYS).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

HELP = """commands:
  /reset             forget the conversation (keeps the system prompt)
  /system TEXT       set the system prompt (empty: none) and reset
  /model NAME        talk to another served model;  /models lists them
  /temperature X     sampling temperature (0 = greedy)
  /top_p X           nucleus sampling
  /max_tokens N      longest reply
  /history           show the conversation so far
  /quit              leave (or Ctrl-D)"""


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256


@dataclass
class ChatSession:
    """A conversation with one served model; ``send`` streams the reply and records both turns."""

    client: Any  # openai.OpenAI
    model: str
    system: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def send(self, text: str) -> Iterator[str]:
        """Yield the reply's text pieces as they arrive; the turn is kept only if the stream finished or was cut
        short by the caller (a partial reply is kept with what arrived)."""
        self.history.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=self.messages(), stream=True, temperature=self.sampling.temperature,
                top_p=self.sampling.top_p, max_tokens=self.sampling.max_tokens)
            try:
                for chunk in stream:
                    if not chunk.choices:
                        continue
                    delta = chunk.choices[0].delta.content
                    if delta:
                        pieces.append(delta)
                        yield delta
            finally:
                stream.close()
        except BaseException:
            if not pieces:  # nothing arrived: forget the question so it can be asked again
                self.history.pop()
                raise
            self.history.append({"role": "assistant", "content": "".join(pieces)})
            raise
        self.history.append({"role": "assistant", "content": "".join(pieces)})

    def reset(self) -> None:
        self.history.clear()


def make_client(url: str, api_key: str | None, timeout: float) -> Any:
    from openai import OpenAI

    base = url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return OpenAI(base_url=base, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none", timeout=timeout,
                  max_retries=0)


def served_models(client: Any) -> list[str]:
    return [m.id for m in client.models.list().data]


def _set_number(session: ChatSession, name: str, raw: str, out: TextIO) -> None:
    kind = int if name == "max_tokens" else float
    try:
        value = kind(raw)
    except ValueError:
        print(f"/{name} needs a number, got {raw!r}", file=out)
        return
    limits = {"temperature": (0, 2), "top_p": (0, 1), "max_tokens": (1, 1 << 20)}[name]
    if not limits[0] <= value <= limits[1] or (name == "top_p" and value == 0):
        print(f"/{name} must be in {'(' if name == 'top_p' else '['}{limits[0]}, {limits[1]}]", file=out)
        return
    setattr(session.sampling, name, value)
    print(f"{name} = {value}", file=out)


def command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Handle a /command; returns False when the user wants to quit."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name == "reset":
        session.reset()
        print("(conversation cleared)", file=out)
    elif name == "system":
        session.system = arg or None
        session.reset()
        print(f"(system prompt {'set' if arg else 'cleared'}; conversation cleared)", file=out)
    elif name == "model" and arg:
        session.model = arg
        print(f"(model = {arg})", file=out)
    elif name in ("models", "model"):
        for m in served_models(session.client):
            print(("* " if m == session.model else "  ") + m, file=out)
    elif name in ("temperature", "top_p", "max_tokens") and arg:
        _set_number(session, name, arg, out)
    elif name == "history":
        for m in session.messages():
            print(f"[{m['role']}] {m['content']}", file=out)
    else:
        print(HELP, file=out)
    return True


def reply(session: ChatSession, text: str, out: TextIO, err: TextIO) -> bool:
    """Stream one answer to ``out``; API errors are shown on ``err``. Returns True on success."""
    import openai

    try:
        for piece in session.send(text):
            out.write(piece)
            out.flush()
        out.write("\n")
        return True
    except KeyboardInterrupt:
        out.write("\n(stopped)\n")
        return False
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        detail = body.get("error") if isinstance(body.get("error"), dict) else body
        msg = detail.get("message")
        print(f"\nerror {e.status_code}: {msg or e.message}", file=err)
    except openai.APIConnectionError as e:
        print(f"\nerror: cannot reach the server ({e.__cause__ or e})", file=err)
    except openai.APIError as e:  # e.g. an error event inside the stream
        print(f"\nerror: {e.message}", file=err)
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("CHAT_URL", "http://127.0.0.1:8000"), help="Server address.")
    ap.add_argument("--model", help="Served model name (default: the first one /v1/models lists).")
    ap.add_argument("--api-key", help="Bearer key (default: $OPENAI_API_KEY).")
    ap.add_argument("--system", help="System prompt.")
    ap.add_argument("--temperature", type=float, default=Sampling.temperature)
    ap.add_argument("--top-p", type=float, default=Sampling.top_p)
    ap.add_argument("--max-tokens", type=int, default=Sampling.max_tokens)
    ap.add_argument("--timeout", type=float, default=600, help="Seconds to wait for a reply.")
    ap.add_argument("--once", metavar="MESSAGE", help="Send one message, print the streamed reply, exit.")
    args = ap.parse_args(argv)

    import openai

    client = make_client(args.url, args.api_key, args.timeout)
    try:
        model = args.model or next(iter(served_models(client)), None)
    except openai.APIStatusError as e:
        print(f"error {e.status_code} from {args.url}/v1/models: {e.message}", file=sys.stderr)
        return 1
    except openai.APIConnectionError:
        print(f"error: cannot reach a server at {args.url} (is it running? `make serve` starts one)", file=sys.stderr)
        return 1
    if model is None:
        print(f"error: {args.url} serves no model", file=sys.stderr)
        return 1
    session = ChatSession(client, model, args.system, Sampling(args.temperature, args.top_p, args.max_tokens))
    if args.once is not None:
        return 0 if reply(session, args.once, sys.stdout, sys.stderr) else 1
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {model} at {args.url}  (/help for commands, Ctrl-D to quit)")
    ok = True
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not command(session, line, sys.stdout):
                break
            continue
        if interactive:
            print(f"{model}> ", end="", flush=True)
        ok = reply(session, line, sys.stdout, sys.stderr) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
