"""Prometheus metrics under vLLM's names (``vllm:...``) so existing vLLM dashboards carry over.

One ``CollectorRegistry`` per engine (no process-global state), labelled ``model_name`` like vLLM.
The engine thread calls the ``StatsListener`` hooks; the HTTP layer counts errors by status code.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving.engine import Sequence, StatsListener

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
FINISH_REASONS = ("stop", "length", "abort")


class EngineMetrics(StatsListener):
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, m = self.registry, model_name
        lab = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", lab, registry=r,
                              buckets=LATENCY_BUCKETS).labels(m)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive output tokens.", lab,
                             registry=r, buckets=ITL_BUCKETS).labels(m)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Mean time per output token of a request.",
                              lab, registry=r, buckets=ITL_BUCKETS).labels(m)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", lab, registry=r,
                             buckets=LATENCY_BUCKETS).labels(m)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time a request waited for a slot.", lab,
                               registry=r, buckets=LATENCY_BUCKETS).labels(m)
        self.prefill_time = Histogram("vllm:request_prefill_time_seconds", "Time from scheduling to first token.",
                                      lab, registry=r, buckets=LATENCY_BUCKETS).labels(m)
        self.decode_time = Histogram("vllm:request_decode_time_seconds", "Time from first to last token.", lab,
                                     registry=r, buckets=LATENCY_BUCKETS).labels(m)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens.", lab, registry=r).labels(m)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", lab, registry=r).labels(m)
        self.req_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", lab, registry=r,
                                    buckets=TOKEN_BUCKETS).labels(m)
        self.req_gen = Histogram("vllm:request_generation_tokens", "Generated tokens per request.", lab, registry=r,
                                 buckets=TOKEN_BUCKETS).labels(m)
        self.running = Gauge("vllm:num_requests_running", "Sequences in the running batch.", lab,
                             registry=r).labels(m)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a slot.", lab, registry=r).labels(m)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use by running "
                              "sequences (0-1).", lab, registry=r).labels(m)
        self.gpu_cache_usage = Gauge("vllm:gpu_cache_usage_perc", "Same as kv_cache_usage_perc (older vLLM name).",
                                     lab, registry=r).labels(m)
        success = Counter("vllm:request_success", "Finished requests by finish reason.", lab + ["finished_reason"],
                          registry=r)
        self.success = {f: success.labels(m, f) for f in FINISH_REASONS}
        self._errors = Counter("vllm:request_errors", "HTTP error responses by status code.", lab + ["status_code"],
                               registry=r)
        self.http_requests = Counter("vllm:http_requests", "HTTP requests by endpoint and status code.",
                                     lab + ["endpoint", "status_code"], registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Sequences preempted (blocks freed, recomputed later) "
                                   "because the KV cache ran out of blocks.", lab, registry=r).labels(m)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      lab, registry=r).labels(m)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (their "
                                   "prefill skipped).", lab, registry=r).labels(m)
        self.cache_config = Gauge("vllm:cache_config_info", "KV cache configuration.",
                                  lab + ["num_slots", "max_model_len", "cache_dtype"], registry=r)

    # engine thread hooks
    def on_admitted(self, seq: Sequence) -> None:
        self.queue.observe(seq.times.scheduled - seq.times.arrival)
        self.prompt_tokens.inc(len(seq.prompt_ids))

    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.inc(queried_tokens)
        self.prefix_hits.inc(hit_tokens)

    def on_preempted(self, seq: Sequence) -> None:
        self.preemptions.inc()

    def on_token(self, seq: Sequence, now: float) -> None:
        self.generation_tokens.inc()
        if seq.times.first_token == now and not seq.output_ids:
            self.ttft.observe(now - seq.times.arrival)
        elif seq.times.last_token is not None:
            self.itl.observe(now - seq.times.last_token)

    def on_finished(self, seq: Sequence) -> None:
        t = seq.times
        reason = seq.finish_reason or "abort"
        if reason in self.success:
            self.success[reason].inc()
        if t.finished is not None:
            self.e2e.observe(t.finished - t.arrival)
        if t.first_token is not None and t.scheduled is not None:
            self.prefill_time.observe(t.first_token - t.scheduled)
            if t.last_token is not None:
                self.decode_time.observe(t.last_token - t.first_token)
                if len(seq.output_ids) > 1:
                    self.tpot.observe((t.last_token - t.first_token) / (len(seq.output_ids) - 1))
        self.req_prompt.observe(len(seq.prompt_ids))
        self.req_gen.observe(len(seq.output_ids))

    def on_step(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        self.gpu_cache_usage.set(kv_usage)

    # HTTP layer
    def error(self, status: int) -> None:
        self._errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
