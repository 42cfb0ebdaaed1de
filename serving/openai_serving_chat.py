"""``POST /v1/chat/completions``: the chat prompt builder and choice builders on ``OpenAIServing``'s flow.

The generated text of each choice goes through an ``OutputParser`` (hook (c) of ``serving.openai_serving``):
the default one passes text through as ``content``; a tool-call parser replaces it to hold back and turn
text into ``tool_calls`` (and may report ``finish_reason: "tool_calls"``), streamed and collected alike.
"""

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
    TopLogprob,
)
from serving.sampler import TokenLogprob

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


class OpenAIServingChat(OpenAIServing):
    request_cls = ChatCompletionRequest
    prompt_param = "messages"
    id_prefix = "chatcmpl"

    def render_prompt(self, req: ChatCompletionRequest, hooks: RequestHooks) -> list[int]:
        tok = self.engine.tokenizer
        msgs = [m.template_dict() for m in req.messages]
        template = None if tok.chat_template else CHATML_TEMPLATE
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, chat_template=template,
                                           **hooks.template_kwargs)
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
