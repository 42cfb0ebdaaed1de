"""The baseline: Hugging Face ``generate`` behind a minimal OpenAI-compatible API, served the way ColossalChat's
inference served models (one ``generate`` call at a time, optionally on a static batch of waiting requests).

``python -m loadtest.baseline_server --model PATH [--port 8001] [--max-batch-size 1] [--name NAME]``

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming with ``stream_options.include_usage``,
``ignore_eos``/``min_tokens``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (vLLM counter names). GPTQ
folders (``quantize_config.json``) load through GPTQModel, others through ``AutoModelForCausalLM``. Needs aiohttp,
torch and transformers only (plus gptqmodel for GPTQ), so it runs where FastAPI and Ray are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

FALLBACK_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _err(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": status}},
                             status=status)


@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    ignore_eos: bool
    temperature: float
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    generated: list[int] = field(default_factory=list)
    done: bool = False

    def push(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class _RowStreamer:
    """A ``generate`` streamer that hands each row of a batch its new token as soon as it is sampled."""

    def __init__(self, jobs: list[Job], eos: set[int]):
        self.jobs, self.eos, self.first = jobs, eos, True

    def put(self, value) -> None:
        if self.first:  # generate passes the prompt first
            self.first = False
            return
        toks = value.reshape(-1).tolist()
        for job, tok in zip(self.jobs, toks, strict=True):
            if job.done:
                continue
            if tok in self.eos and not job.ignore_eos:
                job.done = True
                job.push(("end", "stop"))
                continue
            job.generated.append(tok)
            job.push(("token", tok))
            if len(job.generated) >= job.max_tokens:
                job.done = True
                job.push(("end", "length"))

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                job.done = True
                job.push(("end", "length" if len(job.generated) >= job.max_tokens else "stop"))


class Baseline:
    def __init__(self, model_path: str, name: str, max_batch_size: int, device: str, max_model_len: int):
        self.path, self.name, self.max_batch, self.max_model_len = model_path, name, max_batch_size, max_model_len
        self.device_arg = device
        self.pending: asyncio.Queue[Job] | None = None
        self.counters = {"vllm:prompt_tokens_total": 0, "vllm:generation_tokens_total": 0,
                         "vllm:request_success_total": 0}
        self.ttft = [0, 0.0]  # count, sum
        self.lock = threading.Lock()

    def load(self) -> None:
        import torch
        from transformers import AutoTokenizer

        self.device = self.device_arg if self.device_arg != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(self.path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        if (Path(self.path) / "quantize_config.json").exists():
            from gptqmodel import BACKEND, GPTQModel

            # Marlin, as the project's engine (GPTQModel's auto choice on Hopper, Machete, downloads CUTLASS at load)
            backend = BACKEND.MARLIN if self.device.startswith("cuda") else BACKEND.TORCH
            self.model = GPTQModel.load(self.path, device=self.device, backend=backend)
        else:
            from transformers import AutoModelForCausalLM

            dtype = torch.float16 if self.device == "cuda" else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).to(self.device).eval()
        cfg = getattr(self.model, "config", None) or self.model.model.config
        eos = getattr(cfg, "eos_token_id", None) or self.tok.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.template = self.tok.chat_template or FALLBACK_TEMPLATE

    def generate(self, jobs: list[Job]) -> None:
        import torch

        enc = self.tok.pad({"input_ids": [j.ids for j in jobs]}, return_tensors="pt").to(self.device)
        n = max(j.max_tokens for j in jobs)
        sample = any(j.temperature > 0 for j in jobs)
        kwargs: dict[str, Any] = {"max_new_tokens": n, "do_sample": sample, "pad_token_id": self.tok.pad_token_id,
                                  "streamer": _RowStreamer(jobs, self.eos)}
        if sample:
            kwargs["temperature"] = max(j.temperature for j in jobs)
        if all(j.ignore_eos for j in jobs):
            kwargs["min_new_tokens"] = n
        with torch.inference_mode():
            self.model.generate(**enc, **kwargs)

    async def scheduler(self) -> None:
        """One ``generate`` at a time on up to ``max_batch`` waiting requests (a static batch)."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.pending.get()]
            while len(jobs) < self.max_batch and not self.pending.empty():
                jobs.append(self.pending.get_nowait())
            try:
                await loop.run_in_executor(None, self.generate, jobs)
            except Exception as e:  # noqa: BLE001 - report any generate failure to the waiting clients
                for j in jobs:
                    if not j.done:
                        j.done = True
                        j.push(("error", f"{type(e).__name__}: {e}"))

    # --- HTTP ---------------------------------------------------------------------------------------------------

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.name, "object": "model",
                                                              "owned_by": "baseline"}]})

    async def metrics(self, _: web.Request) -> web.Response:
        lines = []
        for name, v in self.counters.items():
            lines += [f"# TYPE {name.removesuffix('_total')} counter", f'{name}{{model_name="{self.name}"}} {v}']
        h = "vllm:time_to_first_token_seconds"
        lines += [f"# TYPE {h} summary", f'{h}_count{{model_name="{self.name}"}} {self.ttft[0]}',
                  f'{h}_sum{{model_name="{self.name}"}} {self.ttft[1]}']
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        t0 = time.perf_counter()
        try:
            body = await request.json()
        except ValueError:
            return _err(400, "request body is not JSON")
        if not isinstance(body, dict):
            return _err(400, "request body must be a JSON object")
        if body.get("model") not in (None, self.name):
            return _err(404, f"model {body.get('model')!r} not found; this server serves {self.name!r}", "model",
                        "not_found_error")
        try:
            if chat:
                msgs = body["messages"]
                ids = self.tok.apply_chat_template(msgs, chat_template=self.template, add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                prompt = body["prompt"]
                if not isinstance(prompt, str):
                    return _err(400, "prompt must be a string", "prompt")
                ids = self.tok(prompt)["input_ids"]
        except KeyError as e:
            return _err(400, f"missing field {e.args[0]!r}", e.args[0])
        except (TypeError, ValueError) as e:
            return _err(400, f"bad messages: {e}", "messages")
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _err(400, "max_tokens must be a positive integer", "max_tokens")
        if len(ids) + max_tokens > self.max_model_len:
            return _err(400, f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceeds {self.max_model_len}",
                        "max_tokens")
        ignore_eos = bool(body.get("ignore_eos")) or (body.get("min_tokens") or 0) >= max_tokens  # vLLM extensions
        job = Job(list(ids), max_tokens, ignore_eos, float(body.get("temperature") or 0.0), asyncio.Queue(),
                  asyncio.get_running_loop())
        await self.pending.put(job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        obj = "chat.completion" if chat else "text_completion"
        stream = bool(body.get("stream"))
        usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
        resp: web.StreamResponse | None = None
        if stream:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
        emitted = ""
        finish = "stop"
        first = True
        while True:
            kind, val = await job.queue.get()
            if kind == "error":
                if resp is None:
                    return _err(500, val, kind="server_error")
                await resp.write(f"data: {json.dumps({'error': {'message': val, 'code': 500}})}\n\n".encode())
                return resp
            if kind == "end":
                finish = val
                break
            if first:
                first = False
                with self.lock:
                    self.ttft[0] += 1
                    self.ttft[1] += time.perf_counter() - t0
            text = self.tok.decode(job.generated, skip_special_tokens=True)
            delta = text[len(emitted):] if not text.endswith("\ufffd") else ""
            if delta and resp is not None:
                emitted = text
                await resp.write(_sse(rid, obj, chat, self.name, delta, None))
        text = self.tok.decode(job.generated, skip_special_tokens=True)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(job.generated),
                 "total_tokens": len(ids) + len(job.generated)}
        with self.lock:
            self.counters["vllm:prompt_tokens_total"] += len(ids)
            self.counters["vllm:generation_tokens_total"] += len(job.generated)
            self.counters["vllm:request_success_total"] += 1
        if resp is None:
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "finish_reason": finish})
            return web.json_response({"id": rid, "object": obj, "created": int(time.time()), "model": self.name,
                                      "choices": [choice], "usage": usage})
        if text[len(emitted):]:
            await resp.write(_sse(rid, obj, chat, self.name, text[len(emitted):], None))
        await resp.write(_sse(rid, obj, chat, self.name, "", finish))
        if usage_wanted:
            chunk = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": int(time.time()),
                     "model": self.name, "choices": [], "usage": usage}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _sse(rid: str, obj: str, chat: bool, model: str, text: str, finish: str | None) -> bytes:
    choice = ({"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish} if chat
              else {"index": 0, "text": text, "finish_reason": finish})
    chunk = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": int(time.time()), "model": model,
             "choices": [choice]}
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()


def build_app(server: Baseline) -> web.Application:
    app = web.Application(client_max_size=8 * 2**20)

    async def start(_: web.Application) -> None:
        server.pending = asyncio.Queue()
        task = asyncio.create_task(server.scheduler())
        app["scheduler"] = task

    async def stop(_: web.Application) -> None:
        app["scheduler"].cancel()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.add_routes([web.post("/v1/chat/completions", server.chat), web.post("/v1/completions", server.completions),
                    web.get("/v1/models", server.models), web.get("/metrics", server.metrics),
                    web.get("/health", server.health)])
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.baseline_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF or GPTQ model folder.")
    p.add_argument("--name", help="Served model name (default: the folder name).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--max-batch-size", type=int, default=1, help="Requests per generate call (static batch).")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--max-model-len", type=int, default=2048)
    args = p.parse_args(argv)
    if not Path(args.model).is_dir():
        p.error(f"--model {args.model}: no such folder")
    server = Baseline(args.model, args.name or Path(args.model).name, args.max_batch_size, args.device,
                      args.max_model_len)
    server.load()
    print(f"baseline server: {server.name} on {server.device}, batch {args.max_batch_size}, "
          f"http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(build_app(server), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
