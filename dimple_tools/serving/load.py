"""Throughput of `dimple-serve` with batching against one request at a time (a load script, not a test).

    python -m dimple_tools.serving.load --model tiny-dimple --device cpu              # make serve-load
    python -m dimple_tools.serving.load --model PATH --device cuda --max-tokens 64    # a GPU checkpoint

For each mode the script starts the server in a subprocess (127.0.0.1, a free port), warms it up, then sends
`--requests` chat completions (questions about generated shape images, as base64 data: URLs) from
`--concurrency` concurrent clients (asyncio + httpx2), and reports requests per second, latency, the
mean rows per decode (from /metrics) and, on the tiny model, how many answers are right. Modes:

* `batched`: `--max-batch-size` (default: the concurrency) and `--batch-timeout`;
* `sequential`: `--max-batch-size 1`, the same clients: the requests queue and decode one at a time.
"""

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time

from dimple_tools.serving.process import ServerProcess
from dimple_tools.tiny.task import answer_is_correct, generate_samples


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_load(base_url: str, model_id: str, samples: list, concurrency: int, settings: dict, timeout: float) -> dict:
    """`len(samples)` chat completions from `concurrency` clients (asyncio + httpx2, the HTTP client the openai
    package uses, without its response models: the load generator shares the machine and should cost little;
    the `serve` extra installs it)."""
    import httpx2 as httpx

    async def client_loop(client, queue_, results):
        while True:
            try:
                url, question, expected = queue_.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"model": model_id, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}], **settings}
            start = time.perf_counter()
            response = await client.post(base_url + "/v1/chat/completions", json=body)
            response.raise_for_status()
            answer = response.json()["choices"][0]["message"]["content"]
            results.append((answer, expected, time.perf_counter() - start))

    async def run():
        queue_ = asyncio.Queue()
        for sample in samples:
            queue_.put_nowait(sample)
        results = []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            await asyncio.gather(*(client_loop(client, queue_, results) for _ in range(concurrency)))
        return results

    start = time.perf_counter()
    results = asyncio.run(run())
    seconds = time.perf_counter() - start
    latencies = sorted(latency for _, _, latency in results)
    return {
        "requests": len(samples), "seconds": round(seconds, 2), "requests_per_second": round(len(samples) / seconds, 2),
        "latency_mean_s": round(statistics.mean(latencies), 3),
        "latency_p50_s": round(latencies[len(latencies) // 2], 3),
        "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
        "correct": sum(answer_is_correct(answer, expected) for answer, expected, _ in results),
    }


def measure(args, mode: str, samples: list) -> dict:
    batch = 1 if mode == "sequential" else (args.max_batch_size or args.concurrency)
    server_args = ["--model", args.model, "--max-batch-size", str(batch), "--batch-timeout", str(args.batch_timeout),
                   "--served-model-name", "model"]
    if args.device:
        server_args += ["--device", args.device]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    settings = {"max_tokens": args.max_tokens} if args.max_tokens else {}
    settings.update(json.loads(args.extra_body))
    with ServerProcess(*server_args, startup_timeout=args.startup_timeout, log_path=args.log) as server:
        run_load(server.base_url, "model", samples[: min(len(samples), args.concurrency)], args.concurrency, settings,
                 args.timeout)  # warm-up (first-call costs, allocator)
        before = {name: server.metric(name) for name in ("batches", "rows_decoded", "decoding_steps")}
        result = run_load(server.base_url, "model", samples, args.concurrency, settings, args.timeout)
        after = {name: server.metric(name) for name in before}
    batches = max(1, after["batches"] - before["batches"])
    result.update(mode=mode, max_batch_size=batch, batch_timeout=args.batch_timeout if batch > 1 else 0,
                  decodes=after["batches"] - before["batches"],
                  rows_per_decode=round((after["rows_decoded"] - before["rows_decoded"]) / batches, 2),
                  forward_passes=after["decoding_steps"] - before["decoding_steps"])
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="dimple-serve-load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-dimple")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=None, help="batched mode (default: the concurrency)")
    parser.add_argument("--batch-timeout", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=None, help="the answer canvas (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of a CPU worker")
    parser.add_argument("--extra-body", default="{}",
                        help='Dimple settings for every request, JSON, e.g. \'{"alg_p_threshold": 0}\' (one token per step)')
    parser.add_argument("--modes", default="batched,sequential")
    parser.add_argument("--seed", type=int, default=7, help="the generated questions")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--log", default=None, help="the server's output (default: discarded)")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    samples = [(data_url(image), question, answer)
               for image, question, answer, _ in generate_samples(args.requests, seed=args.seed)]
    results = []
    for mode in args.modes.split(","):
        if mode not in ("batched", "sequential"):
            parser.error(f"--modes: batched and/or sequential, got {mode!r}")
        result = measure(args, mode, samples)
        results.append(result)
        print(json.dumps(result), flush=True)
    by_mode = {r["mode"]: r for r in results}
    if {"batched", "sequential"} <= set(by_mode):
        speedup = by_mode["batched"]["requests_per_second"] / by_mode["sequential"]["requests_per_second"]
        print(f"batched / sequential throughput: {speedup:.2f}x")
        results.append({"speedup": round(speedup, 2)})
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
