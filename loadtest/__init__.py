"""Load testing for OpenAI-compatible LLM servers (this project's, vLLM's, TGI's...).

``python -m loadtest --url http://HOST:8000 --model NAME --out DIR --concurrency 1,4,16 --rate 2,8``

Sweeps fixed-concurrency levels and Poisson arrival rates with streaming requests, leaves warm-up requests out,
and writes ``results.json`` (schema: :mod:`loadtest.report`), ``levels.csv``, ``requests.jsonl``, PNG plots and
``report.md``. Modules: ``cli`` (arguments, sweep), ``client`` (one streamed request over aiohttp), ``prompts``
(files, datasets, synthetic), ``runner`` (concurrency and rate levels), ``stats`` (percentiles, SLOs, goodput,
Prometheus scraping), ``report`` (writers and plots), ``baseline_server`` (plain HF ``generate`` behind the same API).
"""

__version__ = "0.1.0"
