"""``POST /v1/chat/completions``: the chat prompt builder and choice builders on ``OpenAIServing``'s flow.

The generated text of each choice goes through an ``OutputParser`` (hook (c) of ``serving.openai_serving``):
the default one passes text through as ``content``; a tool-call parser replaces it to hold back and turn
text into ``tool_calls`` (and may report ``finish_reason: "tool_calls"``), streamed and collected alike.

Tool calling and structured outputs plug in through ``request_hooks``: ``tools`` (unless ``tool_choice`` is
``none``) select ``ToolCallOutputParser``; a forced ``tool_choice`` (``required`` or a named function) or a JSON
``response_format`` adds a grammar processor (``serving.structured``) per choice; the prompt goes through
``serving.tools.render_messages`` (the template's own tool support, else the fallback prompt).
"""

import threading
from typing import Any

from serving.engine import StepOutput
from serving.errors import InvalidRequestError
from serving.openai_serving import ChoiceResult, OpenAIServing, RequestContext, RequestHooks
from serving.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogprob,
    ChatLogprobs,
    ChatResponseMessage,
    DeltaMessage,
    DeltaToolCall,
    ToolCall,
    TopLogprob,
)
from serving.sampler import TokenLogprob
from serving.structured import GrammarCompiler, tool_call_schema
from serving.tools import ToolCallStreamParser, parse_tool_calls, render_messages

# For tokenizers without a chat template of their own (a base model): ChatML, which the SFT stage trains on.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class OutputParser:
    """One choice's generated text -> what the response says. Default: all of it is ``content``.

    Streamed: ``feed`` gets each new piece of text and returns the delta to send now (None: nothing yet, e.g.
    while a tool call is still being generated); ``finish`` is called once with the engine's finish reason and
    returns what was held back plus the finish reason to report. Collected: ``parse`` gets the whole text."""

    def feed(self, text: str) -> DeltaMessage | None:
        return DeltaMessage(content=text) if text else None

    def finish(self, finish_reason: str) -> tuple[DeltaMessage | None, str]:
        return None, finish_reason

    def parse(self, text: str, finish_reason: str | None) -> tuple[ChatResponseMessage, str | None]:
        return ChatResponseMessage(content=text), finish_reason


class ToolCallOutputParser(OutputParser):
    """Generated text -> ``tool_calls`` (``serving.tools``); ``finish_reason`` "tool_calls" when it stopped on
    its own after calling (a call cut at ``max_tokens`` still reports "length")."""

    def __init__(self, names: set[str], forced: bool):
        self.names = names
        self.stream = ToolCallStreamParser(names, forced)

    def feed(self, text: str) -> DeltaMessage | None:
        return self._delta(self.stream.feed(text))

    def finish(self, finish_reason: str) -> tuple[DeltaMessage | None, str]:
        held = self._delta(self.stream.finish())
        return held, "tool_calls" if self.stream.calls and finish_reason == "stop" else finish_reason

    def parse(self, text: str, finish_reason: str | None) -> tuple[ChatResponseMessage, str | None]:
        content, calls = parse_tool_calls(text, self.names)
        message = ChatResponseMessage(content=content, tool_calls=[ToolCall(**c) for c in calls] or None)
        return message, "tool_calls" if calls and finish_reason == "stop" else finish_reason

    @staticmethod
    def _delta(items: list[dict[str, Any]]) -> DeltaMessage | None:
        content = "".join(x["content"] for x in items if "content" in x)
        calls: list[dict[str, Any]] = []
        for x in items:
            for c in x.get("tool_calls", []):
                if calls and calls[-1]["index"] == c["index"] and "id" not in c:  # more arguments of the same call
                    calls[-1]["function"]["arguments"] += c["function"]["arguments"]
                else:
                    calls.append({**c, "function": dict(c["function"])})
        if not content and not calls:
            return None
        return DeltaMessage(content=content or None, tool_calls=[DeltaToolCall(**c) for c in calls] or None)


class OpenAIServingChat(OpenAIServing):
    request_cls = ChatCompletionRequest
    prompt_param = "messages"
    id_prefix = "chatcmpl"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._grammar_compiler: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()

    def request_hooks(self, req: ChatCompletionRequest) -> RequestHooks:
        hooks = RequestHooks()
        grammar = None
        forced = req.forced_tool() if req.tools_enabled() else None
        if req.tools_enabled():
            names = {t.function.name for t in req.tools}
            hooks.output_parser = lambda: ToolCallOutputParser(names, forced=forced is not None)
        if forced is not None:
            fns = [{"name": t.function.name, "parameters": t.function.parameters} for t in req.tools
                   if forced in ("any", t.function.name)]
            grammar = self.grammars().compile(
                tool_call_schema(fns, parallel=forced == "any" and req.parallel_tool_calls is not False), "tools")
        elif req.json_format():
            rf = req.response_format
            grammar = self.grammars().compile(rf.json_schema.schema_ if rf.type == "json_schema" else None,
                                              "response_format")
        if grammar is not None:
            compiler = self.grammars()
            hooks.logits_processors = lambda index: [compiler.processor(grammar)]
        return hooks

    def grammars(self) -> GrammarCompiler:
        """The engine's grammar compiler, built once (the router calls this right after loading the model)."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                e = self.engine
                self._grammar_compiler = GrammarCompiler(e.tokenizer, e.runner.vocab, sorted(e.eos_ids))
            return self._grammar_compiler

    def render_prompt(self, req: ChatCompletionRequest, hooks: RequestHooks) -> list[int]:
        tok = self.engine.tokenizer
        template = None if tok.chat_template else CHATML_TEMPLATE
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools_enabled() else None
        msgs, tool_kwargs = render_messages([m.template_dict() for m in req.messages], tools,
                                            tok.chat_template or CHATML_TEMPLATE,
                                            req.forced_tool() if tools else None)
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, chat_template=template,
                                           **tool_kwargs, **hooks.template_kwargs)
        except Exception as e:  # noqa: BLE001 - a template's own error (e.g. role order) is the client's 400
            raise InvalidRequestError(f"messages could not be rendered with the chat template: {e}",
                                      param="messages") from None
        return tok(text, add_special_tokens=False)["input_ids"]

    def new_output_parser(self, ctx: RequestContext) -> Any:
        return super().new_output_parser(ctx) or OutputParser()

    def _logprob_items(self, lps: list[TokenLogprob] | None) -> list[ChatLogprob]:
        items = []
        for lp in lps or []:
            t = self.decode_token(lp.token_id)
            tops = [(self.decode_token(i), v) for i, v in lp.top]
            items.append(ChatLogprob(token=t, logprob=lp.logprob, bytes=list(t.encode()),
                                     top_logprobs=[TopLogprob(token=s, logprob=v, bytes=list(s.encode()))
                                                   for s, v in tops]))
        return items

    # ------------------------------------------------------------------ collected
    def build_response(self, req: ChatCompletionRequest, ctx: RequestContext,
                       results: list[ChoiceResult]) -> ChatCompletionResponse:
        choices = []
        for r in results:
            message, finish = ctx.parsers[r.index].parse(r.text, r.finish_reason)
            logprobs = None
            if req.logprobs:
                logprobs = ChatLogprobs(content=[x for o in r.outputs for x in self._logprob_items(o.logprobs)])
            choices.append(ChatCompletionChoice(index=r.index, message=message, logprobs=logprobs,
                                                finish_reason=finish))
        return ChatCompletionResponse(id=ctx.response_id, created=ctx.created, model=self.model_name,
                                      choices=choices, usage=ctx.usage())

    # ------------------------------------------------------------------ streamed
    def _chunk(self, ctx: RequestContext, choice: ChatCompletionStreamChoice) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(id=ctx.response_id, created=ctx.created, model=self.model_name,
                                            choices=[choice])

    def stream_start(self, req: ChatCompletionRequest, ctx: RequestContext) -> list[ChatCompletionStreamResponse]:
        return [self._chunk(ctx, ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                                         content="")))
                for i in range(req.n)]

    def stream_chunks(self, req: ChatCompletionRequest, ctx: RequestContext, index: int,
                      out: StepOutput) -> list[ChatCompletionStreamResponse]:
        parser = ctx.parsers[index]
        chunks = []
        delta = parser.feed(out.text) if out.text else None
        logprobs = ChatLogprobs(content=self._logprob_items(out.logprobs)) if out.logprobs else None
        if delta is not None or logprobs is not None:
            chunks.append(self._chunk(ctx, ChatCompletionStreamChoice(index=index, delta=delta or DeltaMessage(),
                                                                      logprobs=logprobs)))
        if out.finish_reason:
            held, finish = parser.finish(out.finish_reason)
            if held is not None:
                chunks.append(self._chunk(ctx, ChatCompletionStreamChoice(index=index, delta=held)))
            chunks.append(self._chunk(ctx, ChatCompletionStreamChoice(index=index, delta=DeltaMessage(),
                                                                      finish_reason=finish)))
        return chunks

    def usage_chunk(self, ctx: RequestContext) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(id=ctx.response_id, created=ctx.created, model=self.model_name,
                                            choices=[], usage=ctx.usage())
