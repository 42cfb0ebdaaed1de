"""``POST /v1/completions`` (the legacy text API): its prompt builder and choice builders on ``OpenAIServing``."""

from serving.engine import StepOutput
from serving.errors import InvalidRequestError
from serving.openai_serving import ChoiceResult, OpenAIServing, RequestContext, RequestHooks
from serving.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse


class OpenAIServingCompletion(OpenAIServing):
    request_cls = CompletionRequest
    prompt_param = "prompt"
    id_prefix = "cmpl"

    def render_prompt(self, req: CompletionRequest, hooks: RequestHooks) -> list[int]:
        if isinstance(req.prompt, str):
            return self.engine.tokenizer(req.prompt)["input_ids"]
        if any(not 0 <= t < self.engine.runner.vocab for t in req.prompt):
            raise InvalidRequestError("prompt token ids out of the vocabulary range", param="prompt")
        return list(req.prompt)

    def _add_logprobs(self, acc: CompletionLogprobs, out: StepOutput, offset: int) -> None:
        for lp in out.logprobs or []:
            t = self.decode_token(lp.token_id)
            acc.tokens.append(t)
            acc.token_logprobs.append(lp.logprob)
            acc.text_offset.append(offset)
            acc.top_logprobs.append({self.decode_token(i): v for i, v in lp.top})
            offset += len(t)

    def build_response(self, req: CompletionRequest, ctx: RequestContext,
                       results: list[ChoiceResult]) -> CompletionResponse:
        choices = []
        for r in results:
            logprobs = None
            if req.logprobs is not None:
                logprobs, offset = CompletionLogprobs(), 0
                for o in r.outputs:
                    self._add_logprobs(logprobs, o, offset)
                    offset += len(o.text)
            choices.append(CompletionChoice(index=r.index, text=r.text, logprobs=logprobs,
                                            finish_reason=r.finish_reason))
        return CompletionResponse(id=ctx.response_id, created=ctx.created, model=self.model_name, choices=choices,
                                  usage=ctx.usage())

    def stream_chunks(self, req: CompletionRequest, ctx: RequestContext, index: int,
                      out: StepOutput) -> list[CompletionResponse]:
        logprobs = None
        if req.logprobs is not None:
            logprobs = CompletionLogprobs()
            self._add_logprobs(logprobs, out, 0)
        choice = CompletionChoice(index=index, text=out.text, logprobs=logprobs, finish_reason=out.finish_reason)
        return [CompletionResponse(id=ctx.response_id, created=ctx.created, model=self.model_name, choices=[choice])]

    def usage_chunk(self, ctx: RequestContext) -> CompletionResponse:
        return CompletionResponse(id=ctx.response_id, created=ctx.created, model=self.model_name, choices=[],
                                  usage=ctx.usage())
