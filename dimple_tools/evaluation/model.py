"""Dimple as an lmms-eval (0.7.x) model: `lmms-eval --model dimple --model_args pretrained=PATH_OR_HUB_ID ...`.

Registered through the entry-point group `lmms_eval.models` (pyproject.toml -> `dimple_tools.evaluation.plugin`),
so an unmodified lmms-eval finds it once this repository is installed with its `eval` extra
(`pip install -e .[eval]`). docs/evaluation.md has the commands for the paper's benchmarks.

Model arguments (`--model_args key=value,...`):
    pretrained        checkpoint folder or Hub id (loaded with AutoModel / AutoProcessor, trust_remote_code)
    device            "cuda" when there is a GPU, else "cpu" (under `accelerate launch`: each process's own)
    dtype             "auto" (bfloat16 on a GPU, float32 on the CPU), or float32 / bfloat16 / float16
    batch_size        questions decoded together (rows of a batch are independent); also `--batch_size`
    system_prompt     a system turn (default: the chat template's "You are a helpful assistant.")
    open_ended_tasks  more task names (or name prefixes) decoded with the open-ended canvas, joined by "+"
    max_pixels / min_pixels   the image processor's pixel bounds (default: the checkpoint's)
    revision, attn_implementation, trust_remote_code   passed to from_pretrained

Decoding settings (`--gen_kwargs key=value,...`): max_new_tokens, steps, alg, alg_temp, alg_p_threshold,
decoding_pipeline, use_original_confidence, use_cache, block_length, dual_cache, stop_at_eos, eps, temperature,
top_p, top_k, do_sample, seed (sampling), until. Defaults are the release's evaluation settings
(`RELEASE_SETTINGS`: an 8-token canvas in 8 steps, maskgit_plus in Dream's pipeline, greedy, prefilling); tasks
whose answers are free text (`OPEN_ENDED_TASKS`, matched on the task name) get a 64-token canvas in 64 steps,
as the release evaluated MM-Vet.

lmms-eval hands the model the task YAML's `generation_kwargs` merged with `--gen_kwargs`, and task YAMLs set
an autoregressive budget (MME `max_new_tokens: 16`, MMBench 1024, MathVista 16384; MM-Vet `temperature: 0.2`).
For a diffusion model that budget is the canvas, i.e. the cost of every forward pass, so it is not taken as
Dimple's setting: `max_new_tokens`, `temperature`, `top_p`, `do_sample`, `num_beams` and the other
autoregressive options of a request count only when the request also sets `steps` -- which no task YAML does
and every Dimple command line does (`--gen_kwargs max_new_tokens=64,steps=64,...`). Without `steps` they are
the task's autoregressive settings: reported once per task and replaced by the defaults above.

What Dimple cannot do is refused with a message, not scored wrong: log-likelihood requests (multiple-choice
scoring by likelihood), multi-round generation, video and audio inputs, beam search and repetition penalties.

Results: `--log_samples` records each answer's token counts (lmms-eval's `efficiency` block), and the
`throughput` block / "Throughput Summary" table reports answer tokens per second (`avg_speed`), seconds per
question (`avg_latency`), the forward passes (`avg_forward_passes_per_question`, the mean over questions of
the passes its batch took) and the number of processes that shared the questions (`avg_processes`). Under
`accelerate launch` the numbers are summed over the processes and the time is the slowest process's.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
try:
    from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
    from lmms_eval.api.model import lmms
except ImportError as _error:  # imported outside lmms-eval, without the `eval` extra
    raise ImportError(
        "dimple_tools.evaluation.model (lmms-eval's `--model dimple`) needs lmms-eval 0.7, the `eval` extra: "
        f"pip install -e '.[eval]' (or make eval-deps); {_error}"
    ) from None
from PIL import Image
from tqdm import tqdm

from dimple_tools.evaluation.settings import (  # noqa: F401  (re-exported with the model class)
    OPEN_ENDED_LENGTH,
    OPEN_ENDED_TASKS,
    RELEASE_SETTINGS,
    DimpleEvalError,
    as_bool,
    build_content,
    decoding_settings,
    flatten_visuals,
    is_open_ended,
    visual_kind,
)


class Dimple(lmms):
    """lmms-eval model class of Dimple (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "rp-yu/Dimple-7B",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        system_prompt: str | None = None,
        open_ended_tasks: str | None = None,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        revision: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = True,
        max_batch_size: Any = None,  # lmms-eval passes it with --batch_size; unused
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise DimpleEvalError(
                f"unknown --model_args for dimple: {sorted(kwargs)}; decoding settings go in --gen_kwargs "
                "(max_new_tokens, steps, alg, ...)"
            )
        from accelerate import Accelerator
        from transformers import AutoModel, AutoProcessor

        accelerator = Accelerator()
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and accelerator.num_processes != launched:
            raise DimpleEvalError(
                f"launched as {launched} processes but accelerate sees {accelerator.num_processes}: every process "
                "would evaluate every question. Without GPUs, set ACCELERATE_USE_CPU=true (`ACCELERATE_USE_CPU=true "
                "accelerate launch --multi_gpu --num_processes N -m lmms_eval ...`)"
            )
        if accelerator.num_processes > 1:
            self._device = accelerator.device
            self.accelerator = accelerator  # lmms-eval synchronises the processes through it
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self._rank, self._world_size = 0, 1
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        elif isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
            torch_dtype = getattr(torch, dtype)
        else:
            raise DimpleEvalError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        trust_remote_code = as_bool("trust_remote_code", trust_remote_code)
        load_kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        processor_kwargs = {k: int(v) for k, v in (("max_pixels", max_pixels), ("min_pixels", min_pixels)) if v is not None}
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code,
                                                       revision=revision, **processor_kwargs)
        import transformers
        from packaging.version import Version

        # `dtype` from transformers 4.56 on; before, `torch_dtype` (an unknown `dtype` would be set on the config).
        dtype_name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        model = AutoModel.from_pretrained(pretrained, **{dtype_name: torch_dtype}, **load_kwargs)
        self._model = model.to(self._device).eval()
        self.pretrained = pretrained
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 1
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise DimpleEvalError(f"batch_size must be >= 1, got {batch_size!r}")
        self.system_prompt = system_prompt
        self.open_ended_extra = tuple(t for t in str(open_ended_tasks or "").replace("|", "+").split("+") if t)
        self._reported_tasks: set = set()

    # ---- lmms-eval's model interface -------------------------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError(
            "Dimple cannot score log-likelihood requests (tasks with output_type loglikelihood or "
            "multiple_choice): a masked-diffusion model has no left-to-right likelihood of a continuation, and "
            "the release evaluated every benchmark by generation. Use the task's generate_until variant (for "
            "multiple choice, the one that asks for the option letter)."
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("Dimple does not implement multi-round generation (generate_until_multi_round)")

    # ---- generation --------------------------------------------------------------------------------------------

    def _visuals(self, request_args) -> list:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request_args
        visuals = flatten_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
        for visual in visuals:
            kind = visual_kind(visual)
            if kind:
                raise DimpleEvalError(
                    f"Dimple evaluates images only: task {task!r} gives {kind} input ({str(visual)[:80]!r}); "
                    "video and audio benchmarks cannot be run with this model"
                )
        images = []
        for visual in visuals:
            if isinstance(visual, Image.Image):
                images.append(visual.convert("RGB") if visual.mode != "RGB" else visual)
            elif isinstance(visual, str):
                images.append(visual)  # a file path or URL: the processor loads it
            else:
                raise DimpleEvalError(f"task {task!r}: unsupported visual input of type {type(visual).__name__}")
        return images

    def _messages(self, context: str, images: list) -> list[dict]:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": build_content(context, images)})
        return messages

    def _report_ignored(self, task: str, ignored: dict, settings: dict) -> None:
        if task in self._reported_tasks:
            return
        self._reported_tasks.add(task)
        shown = {k: settings[k] for k in ("max_new_tokens", "steps", "alg", "decoding_pipeline", "temperature", "top_p")}
        message = f"dimple: task {task!r} decodes with {shown}"
        if ignored:
            message += (
                f"; the task's autoregressive generation settings {ignored} are not used (the request sets no "
                "`steps`): pass `--gen_kwargs max_new_tokens=N,steps=N,...` to choose Dimple's settings"
            )
        if self.rank == 0:
            from loguru import logger

            (logger.warning if ignored else logger.info)(message)

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answers every request: grouped by task and settings, sorted by prompt length, decoded in batches."""
        results: list = [None] * len(requests)
        groups: dict = {}
        for index, request in enumerate(requests):
            context, gen_kwargs, _, _, task, _ = request.args
            key = (task, json.dumps(gen_kwargs, sort_keys=True, default=str))
            groups.setdefault(key, []).append(index)
        stats: dict = {}  # task -> counters (padding requests of multi-process runs left out)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Dimple answering")
        for (task, _), indices in groups.items():
            settings, stops, seed, ignored = decoding_settings(task, requests[indices[0]].args[1], self.open_ended_extra)
            self._report_ignored(task, ignored, settings)
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                answers, counts, passes, seconds = self._decode([requests[i].args for i in batch], settings, seed)
                task_stats = stats.setdefault(task, {"questions": 0, "answer_tokens": 0, "seconds": 0.0,
                                                     "forward_passes": 0, "question_passes": 0})
                task_stats["seconds"] += seconds
                task_stats["forward_passes"] += passes
                for i, answer, (input_tokens, output_tokens) in zip(batch, answers, counts):
                    for stop in stops:
                        answer = answer.split(stop)[0]
                    results[i] = GenerationResult(answer, TokenCounts(input_tokens=input_tokens, output_tokens=output_tokens))
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), answer)
                    if not (requests[i].metadata or {}).get("__padding_only__"):
                        task_stats["questions"] += 1
                        task_stats["answer_tokens"] += output_tokens
                        task_stats["question_passes"] += passes
                progress.update(len(batch))
        progress.close()
        self._log_throughput(stats)
        return results

    @torch.no_grad()
    def _decode(self, batch_args: list, settings: dict, seed):
        """One batch -> (answers, [(prompt tokens, answer tokens)], forward passes, seconds)."""
        conversations = [self._messages(args[0], self._visuals(args)) for args in batch_args]
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_tensors="pt"
        ).to(self.device)
        generator = None
        if seed is not None and settings.get("temperature"):
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = self.model.diffusion_generate(**inputs, return_dict_in_generate=True, generator=generator, **settings)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        prompt_length = inputs["input_ids"].shape[1]
        answers = self.processor.decode_answers(out.sequences, prompt_length=prompt_length)
        tokenizer = self.processor.tokenizer
        stop_ids = {tokenizer.pad_token_id, tokenizer.eos_token_id}
        mask = inputs.get("attention_mask")
        counts = []
        for row, ids in enumerate(out.sequences[:, prompt_length:].tolist()):
            length = next((k for k, t in enumerate(ids) if t in stop_ids), len(ids))
            prompt_tokens = int(mask[row].sum()) if mask is not None else prompt_length
            counts.append((prompt_tokens, length))
        return answers, counts, int(out.num_forward_passes or 0), seconds

    def _log_throughput(self, stats: dict) -> None:
        """Adds this call's numbers to lmms-eval's throughput metrics (the results' `throughput` block), summed
        over the processes of a multi-process run (time: the slowest process's, as they run side by side)."""
        if self.world_size > 1:
            import torch.distributed as dist

            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, stats)
        else:
            gathered = [stats]
        if self.rank != 0:
            return
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        merged: dict = {}
        for rank_stats in gathered:
            for task, values in rank_stats.items():
                target = merged.setdefault(task, {"questions": 0, "answer_tokens": 0, "seconds": 0.0,
                                                  "forward_passes": 0, "question_passes": 0})
                for key, value in values.items():
                    target[key] = max(target[key], value) if key == "seconds" else target[key] + value
        for task, values in merged.items():
            if not values["questions"]:
                continue
            seconds = values["seconds"]
            log_metrics(
                total_elapsed_time=seconds,
                total_gen_tokens=values["answer_tokens"],
                avg_speed=values["answer_tokens"] / seconds if seconds > 0 else 0.0,
                additional_metrics={
                    "total_requests": values["questions"],
                    "forward_passes_per_question": values["question_passes"] / values["questions"],
                    "processes": len(gathered),
                },
            )
