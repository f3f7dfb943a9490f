"""An OpenAI-compatible chat-completions server for Dimple, built on LitServe.

    dimple-serve --model tiny-dimple                       # http://127.0.0.1:8000/v1/chat/completions
    dimple-serve --model rp-yu/Dimple-7B --device cuda --max-batch-size 16 --batch-timeout 0.02

LitServe (`OpenAISpec`) gives the HTTP layer, the chat-completions schema, the request queue, the batch
window (`max_batch_size`, `batch_timeout`) and the worker processes (`workers_per_device` on every device).
This module adds what is Dimple's:

* `DimpleAPI` (the inference worker): turns each request into the processor's inputs (text and `image_url`
  parts: base64 `data:` URLs, and local files under `--image-folder`; remote URLs are refused since the server
  fetches nothing), groups the requests of a batch that decode alike (same canvas and settings) into one
  `diffusion_generate` call, and follows every row after each step: the answer's settled text (committed
  tokens left of the first mask, up to the end-of-text) is sent as it grows, a row ends as soon as its answer
  is settled, a `stop` string is met, or its client went away, and its remaining masks are then never
  decoded. Requests that sample (temperature > 0, or a random `alg` such as `origin`) with a `seed` decode
  alone with their own generator, so the answer does not depend on the batch.
* `DimpleOpenAISpec` (the HTTP side): the Dimple settings of the request body, 400 errors in OpenAI's format
  naming the field, `usage.forward_passes`, `finish_reason`, `/v1/models`, `/metrics`, and client
  disconnects (a closed stream or connection) marked for the worker, which stops that row at its next step.

Every row of a batch decodes as it would alone (Dimple's decisions are per row); greedy decoding is the default
(a request's `temperature` applies only when given).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import pathlib
import signal

import torch

import litserve as ls
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dimple.generation_utils import MAX_STEPS
from dimple_tools.serving.image_cache import IMAGE_CACHE_SIZE
from dimple_tools.serving.limits import MAX_BODY_BYTES, MAX_PENDING_REQUESTS, RETRY_AFTER_SECONDS, add_limits
from dimple_tools.serving.messages import MAX_IMAGE_PIXELS, MAX_IMAGES
from dimple_tools.serving.worker import (MAX_REQUEST_STEPS, MAX_TOKENS_LIMIT, OPEN_ENDED_MAX_TOKENS, REQUEST_TIMEOUT,
                                         DimpleAPI)
from dimple_tools.serving.openai_spec import DimpleOpenAISpec
from dimple_tools.serving.errors import RequestError, http_error_handler, request_error_handler, validation_error_handler
from dimple_tools.serving.state import SharedState
from dimple_tools.serving.continuous import ContinuousDimpleAPI


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dimple-serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--served-model-name", help="the model id clients send (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"),
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                        help="default auto: bfloat16 on the GPU, float32 on the CPU")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="most requests decoded together (1: one at a time)")
    parser.add_argument("--batching", choices=("group", "continuous"), default="group",
                        help="group: the requests of a batch window decode together to the end; continuous: requests "
                             "join and leave one running batch between denoising passes (a fixed canvas per request: "
                             "the checkpoint's max_new_tokens without max_tokens)")
    parser.add_argument("--batch-timeout", type=float, default=0.02,
                        help="seconds a worker waits for a batch to fill")
    parser.add_argument("--workers-per-device", type=int, default=1,
                        help="model copies per device (one per GPU is usual; a batch keeps a GPU busy)")
    parser.add_argument("--image-folder", default=None,
                        help="folder local image paths (or file:// URLs) may be read from (default: none allowed)")
    parser.add_argument("--open-ended-max-tokens", type=int, default=OPEN_ENDED_MAX_TOKENS,
                        help="the longest answer of a request without max_tokens, decoded open-ended: the canvas grows "
                             f"block by block until the answer's end-of-text (default {OPEN_ENDED_MAX_TOKENS})")
    parser.add_argument("--api-key", default=os.environ.get("DIMPLE_API_KEY"),
                        help="require `Authorization: Bearer KEY` on every route but /health (default: the "
                             "DIMPLE_API_KEY environment variable; none: no authentication)")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"largest request body, checked on its Content-Length before it is read (default {MAX_BODY_BYTES})")
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="largest image (width x height), checked on its header before its pixels are decoded "
                             f"(default {MAX_IMAGE_PIXELS})")
    parser.add_argument("--max-images", type=int, default=MAX_IMAGES, help=f"most images per request (default {MAX_IMAGES})")
    parser.add_argument("--max-tokens-limit", type=int, default=MAX_TOKENS_LIMIT,
                        help=f"largest max_tokens (and open-ended bound) a request may ask for (default {MAX_TOKENS_LIMIT})")
    parser.add_argument("--max-steps", type=int, default=MAX_REQUEST_STEPS,
                        help=f"largest steps a request may ask for (default {MAX_REQUEST_STEPS})")
    parser.add_argument("--image-cache-size", type=int, default=IMAGE_CACHE_SIZE,
                        help="images whose vision-tower features are kept for reuse (least recently used out; 0: "
                             f"off; default {IMAGE_CACHE_SIZE}); hits and misses in /metrics")
    parser.add_argument("--max-pending-requests", type=int, default=MAX_PENDING_REQUESTS,
                        help="most chat completions held at once, decoding or waiting; one more gets 429 with "
                             f"Retry-After (default {MAX_PENDING_REQUESTS})")
    parser.add_argument("--retry-after", type=int, default=RETRY_AFTER_SECONDS,
                        help=f"the Retry-After seconds of that 429 (default {RETRY_AFTER_SECONDS})")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT,
                        help="seconds a request may decode; one still decoding then ends with a 504 error "
                             f"(default {REQUEST_TIMEOUT:g})")
    parser.add_argument("--queue-timeout", type=float, default=600,
                        help="seconds a request may wait in the queue before a 504")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per CPU worker (default: the cores / workers-per-device)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    return parser


def check_args(parser, args) -> None:
    if not 1024 <= args.port <= 65535:
        parser.error(f"--port must be in [1024, 65535], got {args.port}")
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if not (math.isfinite(args.batch_timeout) and args.batch_timeout >= 0):
        parser.error(f"--batch-timeout must be a number >= 0, got {args.batch_timeout}")
    if not (math.isfinite(args.request_timeout) and args.request_timeout > 0):
        parser.error(f"--request-timeout must be a number of seconds > 0, got {args.request_timeout}")
    if not (math.isfinite(args.queue_timeout) and args.queue_timeout > 0):
        parser.error(f"--queue-timeout must be a number of seconds > 0, got {args.queue_timeout}")
    if args.workers_per_device < 1:
        parser.error(f"--workers-per-device must be >= 1, got {args.workers_per_device}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not 1 <= args.open_ended_max_tokens <= MAX_STEPS:
        parser.error(f"--open-ended-max-tokens must be an integer from 1 to {MAX_STEPS}, got {args.open_ended_max_tokens}")
    for flag, value in (("--max-body-bytes", args.max_body_bytes), ("--max-image-pixels", args.max_image_pixels),
                        ("--max-images", args.max_images), ("--max-tokens-limit", args.max_tokens_limit),
                        ("--max-steps", args.max_steps), ("--max-pending-requests", args.max_pending_requests),
                        ("--retry-after", args.retry_after)):
        if value < 1:
            parser.error(f"{flag} must be an integer >= 1, got {value}")
    if args.image_cache_size < 0:
        parser.error(f"--image-cache-size must be an integer >= 0, got {args.image_cache_size}")
    if args.open_ended_max_tokens > args.max_tokens_limit:
        parser.error(f"--open-ended-max-tokens ({args.open_ended_max_tokens}) must be at most --max-tokens-limit "
                     f"({args.max_tokens_limit})")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key (or DIMPLE_API_KEY) must not be empty")
    if args.image_folder is not None and not os.path.isdir(args.image_folder):
        parser.error(f"--image-folder must be a folder, got {args.image_folder!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")


def model_info(model_path: str) -> dict:
    """What /v1/models says about the checkpoint: its context size and decoding defaults (local folders)."""
    info = {}
    folder = pathlib.Path(model_path)
    try:
        config = json.loads((folder / "config.json").read_text())
        info["max_model_len"] = config.get("max_position_embeddings")
        info["decoding_defaults"] = json.loads((folder / "generation_config.json").read_text())
        info["decoding_defaults"].pop("transformers_version", None)
    except (OSError, ValueError):
        pass
    return info


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads
    if device == "cpu" and threads is None:
        threads = max(1, (os.cpu_count() or 1) // args.workers_per_device)
    model_id = args.served_model_name or pathlib.Path(args.model.rstrip("/")).name or args.model
    logging.basicConfig(level=getattr(logging, args.log_level.upper()))

    manager = multiprocessing.Manager()
    shared = SharedState(manager)
    spec = DimpleOpenAISpec(model_id, shared, model_info(args.model), queue_timeout=args.queue_timeout)
    api_class = ContinuousDimpleAPI if args.batching == "continuous" else DimpleAPI
    api = api_class(args.model, shared, dtype=args.dtype, image_folder=args.image_folder, threads=threads,
                    open_ended_max_tokens=args.open_ended_max_tokens, max_image_pixels=args.max_image_pixels,
                    max_images=args.max_images, max_tokens_limit=args.max_tokens_limit, max_steps=args.max_steps,
                    image_cache_size=args.image_cache_size, decode_timeout=args.request_timeout,
                    max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, spec=spec)
    # fast_queue: LitServe's ZeroMQ transport from the workers to the HTTP servers (the default goes through a
    # multiprocessing manager: a round trip per streamed item)
    server = ls.LitServer(api, accelerator=device, devices="auto", workers_per_device=args.workers_per_device,
                          timeout=args.queue_timeout, model_metadata={"model": model_id}, fast_queue=True)
    server.app.add_exception_handler(RequestError, request_error_handler)
    server.app.add_exception_handler(RequestValidationError, validation_error_handler)
    server.app.add_exception_handler(StarletteHTTPException, http_error_handler)
    add_limits(server.app, args.api_key, args.max_body_bytes, args.max_pending_requests, args.retry_after)

    main_pid = os.getpid()

    def terminate(signum, frame):  # SIGTERM (docker stop, kill): LitServe's graceful shutdown, as on Ctrl-C
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked HTTP server inherited this handler: just exit
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, terminate)
    try:
        server.run(host=args.host, port=args.port, generate_client_file=False, log_level=args.log_level)
    finally:
        manager.shutdown()


if __name__ == "__main__":
    # `python -m dimple_tools.serving.server`: run the imported module's main, so that the classes LitServe pickles for its
    # spawned workers are `dimple_tools.serving.server.*`, not `__main__.*`.
    from dimple_tools.serving.server import main as _main

    _main()
