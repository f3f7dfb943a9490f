"""Throughput and latency of `dimple-serve`'s batching modes, side by side (a load script, not a test).

    python -m dimple_tools.serving.load --model tiny-dimple --device cpu              # make serve-load
    python -m dimple_tools.serving.load --modes group,continuous --concurrency 1,8,32 --requests 300 \
        --max-tokens 48 --check-alone --json benchmarks/serve_continuous_tiny.json
    python -m dimple_tools.serving.load --model PATH --device cuda --max-tokens 64    # a GPU checkpoint

For each mode and concurrency the script starts the server in a subprocess (127.0.0.1, a free port), warms it
up, then sends `--requests` chat completions (the tiny task's mixed questions about generated shape images:
scene descriptions of up to ~40 tokens and one-word answers, as base64 data: URLs) from that many concurrent
clients (asyncio + httpx2), and reports requests per second, latency (mean, p50, p95, p99), the mean rows per
decode (from /metrics) and, on the tiny model, how many answers are right. Modes:

* `group` (or `batched`): `--batching group`, `--max-batch-size` (default: the concurrency) and `--batch-timeout`:
  the requests of a batch window decode together to the end;
* `continuous`: `--batching continuous`, `--max-batch-size` rows: requests join and leave between passes;
* `sequential`: `--max-batch-size 1`, the same clients: the requests queue and decode one at a time.

`--check-alone` also decodes every request alone in this process (`diffusion_generate`, batch 1, the same
settings) and counts the server's answers equal to it.
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
                index, (url, question, expected) = queue_.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"model": model_id, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}], **settings}
            start = time.perf_counter()
            response = await client.post(base_url + "/v1/chat/completions", json=body)
            response.raise_for_status()
            answer = response.json()["choices"][0]["message"]["content"]
            results.append((answer, expected, time.perf_counter() - start, index))

    async def run():
        queue_ = asyncio.Queue()
        for sample in enumerate(samples):
            queue_.put_nowait(sample)
        results = []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            await asyncio.gather(*(client_loop(client, queue_, results) for _ in range(concurrency)))
        return results

    start = time.perf_counter()
    results = asyncio.run(run())
    seconds = time.perf_counter() - start
    latencies = sorted(latency for _, _, latency, _ in results)

    def percentile(q):
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3)

    return {
        "requests": len(samples), "seconds": round(seconds, 2), "requests_per_second": round(len(samples) / seconds, 2),
        "latency_mean_s": round(statistics.mean(latencies), 3),
        "latency_p50_s": round(latencies[len(latencies) // 2], 3),
        "latency_p95_s": percentile(0.95), "latency_p99_s": percentile(0.99),
        "correct": sum(answer_is_correct(answer, expected) for answer, expected, _, _ in results),
        "answers": {index: answer for answer, _, _, index in results},
    }


def request_settings(args) -> dict:
    settings = {"max_tokens": args.max_tokens} if args.max_tokens else {}
    settings.update(json.loads(args.extra_body))
    return settings


def measure(args, mode: str, concurrency: int, samples: list) -> dict:
    batch = 1 if mode == "sequential" else (args.max_batch_size or concurrency)
    server_args = ["--model", args.model, "--max-batch-size", str(batch), "--batch-timeout", str(args.batch_timeout),
                   "--served-model-name", "model", "--batching", "continuous" if mode == "continuous" else "group"]
    if args.device:
        server_args += ["--device", args.device]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    settings = request_settings(args)
    with ServerProcess(*server_args, startup_timeout=args.startup_timeout, log_path=args.log) as server:
        run_load(server.base_url, "model", samples[: min(len(samples), concurrency)], concurrency, settings,
                 args.timeout)  # warm-up (first-call costs, allocator)
        before = {name: server.metric(name) for name in ("batches", "rows_decoded", "decoding_steps")}
        result = run_load(server.base_url, "model", samples, concurrency, settings, args.timeout)
        after = {name: server.metric(name) for name in before}
    batches = max(1, after["batches"] - before["batches"])
    result.update(mode=mode, concurrency=concurrency, max_batch_size=batch, batch_timeout=args.batch_timeout if batch > 1 else 0,
                  decodes=after["batches"] - before["batches"],
                  rows_per_decode=round((after["rows_decoded"] - before["rows_decoded"]) / batches, 2),
                  forward_passes=after["decoding_steps"] - before["decoding_steps"])
    return result


def alone_answers(args, images: list, questions: list) -> list:
    """Every request decoded alone in this process (`diffusion_generate`, batch 1), as the server's text."""
    import torch

    from dimple.modeling_dimple import DimpleModel
    from dimple.processing_dimple import DimpleProcessor

    processor = DimpleProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = DimpleModel.from_pretrained(args.model).eval()
    kwargs = {("max_new_tokens" if key == "max_tokens" else key): value for key, value in request_settings(args).items()}
    kwargs.setdefault("max_new_tokens", model.generation_config.max_new_tokens)
    tokenizer = processor.tokenizer
    end_ids = {tokenizer.pad_token_id, tokenizer.eos_token_id} - {None}
    mask_id = model.generation_config.mask_token_id
    answers = []
    with torch.inference_mode():
        for image, question in zip(images, questions):
            conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": question}]}]
            inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt", split_special_tokens=True)
            tokens = model.diffusion_generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1]:].tolist()
            end = next((i for i, t in enumerate(tokens) if t == mask_id or t in end_ids), len(tokens))
            answers.append(tokenizer.decode(tokens[:end], skip_special_tokens=True))
    return answers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="dimple-serve-load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-dimple")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", default="16", help="concurrent clients; a comma-separated list runs each")
    parser.add_argument("--max-batch-size", type=int, default=None, help="group and continuous modes (default: the "
                                                                         "concurrency)")
    parser.add_argument("--batch-timeout", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=None, help="the answer canvas (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of a CPU worker")
    parser.add_argument("--extra-body", default="{}",
                        help='Dimple settings for every request, JSON, e.g. \'{"alg_p_threshold": 0}\' (one token per step)')
    parser.add_argument("--modes", default="group,sequential", help="comma-separated: group (batched), continuous, "
                                                                    "sequential")
    parser.add_argument("--check-alone", action="store_true",
                        help="count the answers equal to decoding each request alone")
    parser.add_argument("--seed", type=int, default=7, help="the generated questions")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--log", default=None, help="the server's output (default: discarded)")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)
    try:
        concurrencies = [int(value) for value in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency: integers separated by commas, got {args.concurrency!r}")
    if args.requests < 1 or min(concurrencies) < 1:
        parser.error("--requests and --concurrency must be >= 1")
    modes = ["group" if mode == "batched" else mode for mode in args.modes.split(",")]
    for mode in modes:
        if mode not in ("group", "continuous", "sequential"):
            parser.error(f"--modes: group, continuous and/or sequential, got {mode!r}")
    generated = generate_samples(args.requests, seed=args.seed)
    samples = [(data_url(image), question, answer) for image, question, answer, _ in generated]
    alone = alone_answers(args, [image for image, *_ in generated], [q for _, q, _ in samples]) if args.check_alone else None
    results = []
    for concurrency in concurrencies:
        for mode in modes:
            result = measure(args, mode, concurrency, samples)
            answers = result.pop("answers")
            if alone is not None:
                result["equal_to_alone"] = sum(answers[i] == alone[i] for i in answers)
            results.append(result)
            print(json.dumps(result), flush=True)
        by_mode = {r["mode"]: r for r in results if r.get("concurrency") == concurrency}
        for mode in ("continuous", "group"):
            base = "group" if mode == "continuous" else "sequential"
            if {mode, base} <= set(by_mode):
                ratio = {"compare": f"{mode} / {base}", "concurrency": concurrency,
                         "throughput_ratio": round(by_mode[mode]["requests_per_second"]
                                                   / by_mode[base]["requests_per_second"], 2),
                         "p99_latency_ratio": round(by_mode[mode]["latency_p99_s"] / by_mode[base]["latency_p99_s"], 2)}
                results.append(ratio)
                print(json.dumps(ratio), flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
