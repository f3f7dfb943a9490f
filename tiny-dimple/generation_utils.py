"""Diffusion decoding for Dimple (`diffusion_generate`).

The answer is a canvas of mask tokens appended to the prompt. Every step runs the model once, scores
every masked position (a sampled or greedy token and a confidence), and commits some of them; committed
tokens never change. Decoding is built from small pieces on one loop:

* `score_positions`: logits -> (token, confidence) for every canvas position;
* a pipeline (`DimPipeline`, `DreamPipeline`): how many positions each row commits at a step;
* `choose_positions`: which ones, by `alg` (random, leftmost, most confident, or sampled by confidence);
* `plan_blocks`: optional block-wise decoding (blocks left to right, each its own run of the pipeline),
  with `DenoisingForward` running only what changed (prefilling, Fast-dLLM's dual cache).

All decisions are per row, so a row's answer does not depend on the rest of the batch. Inside a step
the only host synchronisation is the "any mask left?" check that ends `dim` decoding early.
"""

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, TextStreamer
from transformers.utils import ModelOutput


ALGORITHMS = ("origin", "origin-ratio", "autoregressive", "maskgit_plus", "topk_margin", "entropy")
PIPELINES = ("dim", "dream")
BOOLEAN_FLAGS = (
    "use_original_confidence", "stop_at_eos", "use_cache", "output_history", "dual_cache", "use_cuda_graph",
    "use_torch_compile", "return_dict_in_generate",
)
CONFIDENCE_ALGORITHMS = ("maskgit_plus", "topk_margin", "entropy")
# The settings `diffusion_generate` takes as keyword arguments (besides the inputs, hooks, streamer, generator,
# response prior and tokenizer). Other `GenerationConfig` fields (num_beams, repetition_penalty, ...) are
# autoregressive and would be silently ignored: they are refused.
SETTINGS = (
    "max_new_tokens", "max_length", "steps", "eps", "temperature", "top_p", "top_k", "alg", "alg_temp",
    "alg_p_threshold", "use_original_confidence", "decoding_pipeline", "use_cache", "block_length", "dual_cache",
    "stop_at_eos", "use_cuda_graph", "use_torch_compile", "output_history", "return_dict_in_generate",
    "num_return_sequences", "mask_token_id", "pad_token_id", "eos_token_id", "do_sample",
)
MIN_TEMPERATURE = 1e-6


class DimpleGenerationConfig(GenerationConfig):
    r"""`GenerationConfig` with Dimple's diffusion-decoding fields.

    Args:
        steps (`int`, defaults to 512): most denoising steps (forward passes).
        eps (`float`, defaults to 1e-3): end of the schedule τ = linspace(1, eps, steps + 1).
        alg (`str`, defaults to `"origin"`): which masked positions to commit; one of `ALGORITHMS`.
        alg_temp (`float`, *optional*): if > 0, confidence algorithms sample positions from
            softmax(confidence / alg_temp) instead of taking the most confident.
        alg_p_threshold (`float`, *optional*): confident decoding (`dim`): commit every masked position whose
            confidence exceeds it; the schedule is used at steps where none does.
        use_original_confidence (`bool`, defaults to `True`): confidence from the unmodified distribution
            (before temperature / top-p / top-k) in the `dim` pipeline.
        decoding_pipeline (`str`, defaults to `"dim"`): `"dim"` (Dimple, early exit) or `"dream"`.
        temperature (`float`, defaults to 0.0): 0 is greedy, else >= 1e-6. `top_p` / `top_k` are off unless set.
        mask_token_id (`int`, *optional*): the `<|mask|>` id (defaults to the model config's).
        stop_at_eos (`bool`, defaults to `False`): once a row commits an end-of-text token at position k,
            its masks after k become `<|endoftext|>` at once (saves passes; the release does not do this).
        use_cache (`bool`, defaults to `False` here): prefilling: reuse the prompt's keys/values.
        output_history (`bool`, defaults to `False`): keep the sequences after every step.
        block_length (`int`, *optional*): block-wise (semi-autoregressive) decoding: the canvas is split into
            blocks of this many positions, decoded left to right, each with its share of `steps`; positions of
            later blocks stay masks until their block comes. Must divide `max_new_tokens`.
        dual_cache (`bool`, defaults to `False`): with `block_length`, Fast-dLLM's dual cache: each block's first
            step runs the sequence and caches every position's keys/values; its later steps recompute only the
            block (and the position before it), reading the prompt and the other blocks from the cache. With
            `use_cache` too, the prompt's keys/values stay those of the first step (refreshes run the canvas).
        use_cuda_graph (`bool`, defaults to `True`): on CUDA, capture the fixed-shape cached steps once as
            CUDA graphs and replay them (same kernels, same results, no per-kernel launch cost).
        use_torch_compile (`bool`, defaults to `False`): run the cached steps (prefilled, dual-cache window)
            through `torch.compile` of the model's forward, which fuses the small element-wise kernels (rotary,
            residual adds, casts). Compiled once per kind of pass (for batch 1 and for larger batches); other
            prompt lengths and batch sizes reuse it. The first decodes pay the compilation.
    """

    def __init__(self, **kwargs):
        self.steps = kwargs.pop("steps", 512)
        self.eps = kwargs.pop("eps", 1e-3)
        self.alg = kwargs.pop("alg", "origin")
        self.alg_temp = kwargs.pop("alg_temp", None)
        self.alg_p_threshold = kwargs.pop("alg_p_threshold", None)
        self.use_original_confidence = kwargs.pop("use_original_confidence", True)
        self.decoding_pipeline = kwargs.pop("decoding_pipeline", "dim")
        self.mask_token_id = kwargs.pop("mask_token_id", None)
        self.stop_at_eos = kwargs.pop("stop_at_eos", False)
        self.output_history = kwargs.pop("output_history", False)
        self.block_length = kwargs.pop("block_length", None)
        self.dual_cache = kwargs.pop("dual_cache", False)
        self.use_cuda_graph = kwargs.pop("use_cuda_graph", True)
        self.use_torch_compile = kwargs.pop("use_torch_compile", False)
        kwargs.setdefault("max_new_tokens", None if "max_length" in kwargs else 64)
        # Sampling filters are off unless asked for (transformers 4.x GenerationConfig defaults top_k=50).
        temperature = kwargs.pop("temperature", 0.0)
        top_p = kwargs.pop("top_p", None)
        top_k = kwargs.pop("top_k", None)
        kwargs.setdefault("use_cache", False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GenerationConfig's checks are about autoregressive sampling
            super().__init__(**kwargs)
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        # transformers 5 leaves these None by default.
        self.num_return_sequences = 1 if self.num_return_sequences is None else self.num_return_sequences
        self.return_dict_in_generate = bool(self.return_dict_in_generate)

    def validate(self, *args, **kwargs):
        """Autoregressive-sampling checks of the base class do not apply; see `check_generation_config`."""

    def to_diff_dict(self) -> dict:
        """What `save_pretrained` writes, in terms `from_pretrained` reads back the same: it reads the file as
        transformers' `GenerationConfig`. Greedy decoding (temperature 0, the default) is left out, since 4.46–4.5x
        warn that `temperature=0.0` without `do_sample` is a mistake "the corresponding file should fix";
        sampling (temperature > 0) is written with `do_sample: true`, without which 4.x drops temperature 1.0
        (its own default) and 5.x warns that the temperature may be ignored."""
        values = super().to_diff_dict()
        values.pop("temperature", None)
        if self.temperature:
            values.update(do_sample=True, temperature=self.temperature)
        return values


def _is_int(value) -> bool:  # a bool is an int to Python, but `steps=True` is a mistake
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_generation_config(config: DimpleGenerationConfig) -> None:
    """Raise a ValueError naming the argument and its allowed values for anything out of range."""

    def fail(name, allowed, value):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")

    for flag in BOOLEAN_FLAGS:  # a string such as "false" would otherwise switch the option on
        if not isinstance(getattr(config, flag), bool):
            fail(flag, "True or False", getattr(config, flag))
    if config.alg not in ALGORITHMS:
        fail("alg", f"one of {ALGORITHMS}", config.alg)
    if config.decoding_pipeline not in PIPELINES:
        fail("decoding_pipeline", f"one of {PIPELINES}", config.decoding_pipeline)
    if not _is_int(config.steps) or config.steps < 1:
        fail("steps", "an integer >= 1", config.steps)
    if config.max_new_tokens is not None and (not _is_int(config.max_new_tokens) or config.max_new_tokens < 1):
        fail("max_new_tokens", "an integer >= 1", config.max_new_tokens)
    if config.alg_p_threshold is not None and not (_is_real(config.alg_p_threshold) and 0 <= config.alg_p_threshold <= 1):
        fail("alg_p_threshold", "a number in [0, 1] (or None)", config.alg_p_threshold)
    if config.top_p is not None and not (_is_real(config.top_p) and 0 < config.top_p <= 1):
        fail("top_p", "a number in (0, 1] (or None)", config.top_p)
    if config.top_k is not None and (not _is_int(config.top_k) or config.top_k < 1):
        fail("top_k", "an integer >= 1 (or None)", config.top_k)
    if not (_is_real(config.temperature) and (config.temperature == 0 or config.temperature >= MIN_TEMPERATURE)):
        # below it, sampling is greedy in effect and the scaled logits can overflow to inf (NaN probabilities)
        fail("temperature", f"0 (greedy) or a number >= {MIN_TEMPERATURE}", config.temperature)
    if not (_is_real(config.eps) and 0 < config.eps < 1):
        fail("eps", "a number in (0, 1)", config.eps)
    if config.alg_temp is not None and not (_is_real(config.alg_temp) and config.alg_temp >= 0):
        fail("alg_temp", "a number >= 0 (or None)", config.alg_temp)
    if not _is_int(config.num_return_sequences) or config.num_return_sequences < 1:
        fail("num_return_sequences", "an integer >= 1", config.num_return_sequences)
    if not _is_int(config.mask_token_id) or config.mask_token_id < 0:
        fail("mask_token_id", "a token id (in the generation config or the model config)", config.mask_token_id)
    if not _is_int(config.pad_token_id) or config.pad_token_id < 0:  # it fills the answer after an end-of-text
        fail("pad_token_id", "a token id (by default the model's padding or end-of-text token)", config.pad_token_id)
    if not all(_is_int(i) and i >= 0 for i in _as_list(config.eos_token_id)):
        fail("eos_token_id", "a token id, a list of token ids, or None", config.eos_token_id)
    if config.block_length is not None:
        if not _is_int(config.block_length) or config.block_length < 1:
            fail("block_length", "an integer >= 1 (or None)", config.block_length)
        if config.max_new_tokens % config.block_length:
            fail("block_length", f"a divisor of max_new_tokens ({config.max_new_tokens})", config.block_length)
        n_blocks = config.max_new_tokens // config.block_length
        if config.steps < n_blocks:
            fail("steps", f">= the number of blocks ({n_blocks} blocks of block_length {config.block_length})",
                 config.steps)
    if config.dual_cache and config.block_length is None:
        fail("dual_cache", "False unless `block_length` is set (the cache is refreshed at block boundaries)",
             config.dual_cache)


def fields_set_by(config: GenerationConfig) -> dict:
    """The fields a generation config sets: those that differ from its class's defaults (a
    `DimpleGenerationConfig`'s, or transformers' `GenerationConfig`'s, whose autoregressive defaults such as
    4.x's top_k=50 must not leak into diffusion decoding, with `do_sample` or without: on 4.x a file's
    explicit top_k 50 reads the same as none). `do_sample` without a temperature samples at 1.0."""
    dimple = isinstance(config, DimpleGenerationConfig)
    defaults = (DimpleGenerationConfig() if dimple else GenerationConfig()).to_dict()
    values = {k: v for k, v in config.to_dict().items() if k not in defaults or defaults[k] != v}
    if not dimple and config.use_cache is not None:
        values["use_cache"] = config.use_cache  # transformers 4.x's default is True, the release's setting
    return {k: v for k, v in values.items() if not k.startswith("_") and k != "transformers_version"}


@dataclass
class DimpleGenerationOutput(ModelOutput):
    """Result of `diffusion_generate(..., return_dict_in_generate=True)`.

    Args:
        sequences (`torch.LongTensor` of shape `(batch * num_return_sequences, prompt + max_new_tokens)`).
        history (`tuple[torch.LongTensor]`, *optional*): the sequences after every step (`output_history`).
        num_forward_passes (`int`): model forward passes taken.
    """

    sequences: torch.LongTensor = None
    history: Optional[tuple] = None
    num_forward_passes: Optional[int] = None


# --------------------------------------------------------------------------------------------------
# Pieces of a step
# --------------------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, temperature: float, top_p: Optional[float], top_k: Optional[int]):
    """Temperature, then nucleus (top-p), then top-k filtering (removed tokens get -inf)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def score_positions(logits: torch.Tensor, config, original_confidence: bool, generator=None):
    """Token and confidence for every row of `logits` (decoding passes those of the masked positions): the
    token is sampled (temperature > 0) or the argmax of the filtered distribution; the confidence depends on
    `alg` and is computed from the unmodified distribution when `original_confidence`. Computed in fp32."""
    raw = logits.float()
    # `<|mask|>` is never a generated token: a committed mask would be re-opened at the next step (and `dim`
    # could end with masks in the answer). A trained model gives it ~0 probability, so this changes nothing there.
    candidates = raw.clone()
    candidates[..., config.mask_token_id] = float("-inf")  # a scalar fill: no host-device copy
    filtered = filter_logits(candidates, config.temperature, config.top_p, config.top_k)
    if config.temperature > 0:
        probs = filtered.softmax(dim=-1)
        # torch.multinomial's draw of one sample, argmax(p / q) with q ~ Exp(1) (the same numbers for the same
        # generator), without the two validity checks it reads back to the host: no sync inside the step.
        tokens = (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(dim=-1)
    else:
        probs, tokens = None, filtered.argmax(dim=-1)  # greedy needs no softmax of the filtered logits
    if original_confidence or probs is None:
        probs = (raw if original_confidence else filtered).softmax(dim=-1)
    if config.alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif config.alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    else:
        confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, confidence


def scatter_scores(tokens, confidence, masked, block_tokens) -> tuple:
    """The tokens and confidences scored at the flat positions `masked` of a `(batch, block)` canvas, placed
    into `(batch, block)` tensors on the canvas's device: the block's own tokens and -inf confidence elsewhere
    (never committed). (The head's device may differ from the canvas's when the model is split over devices.)"""
    device = block_tokens.device
    all_tokens = block_tokens.flatten().index_copy(0, masked, tokens.to(device)).view_as(block_tokens)
    all_confidence = torch.full(block_tokens.shape, float("-inf"), device=device, dtype=confidence.dtype)
    all_confidence.view(-1).index_copy_(0, masked, confidence.to(device))
    return all_tokens, all_confidence


def top_k_per_row(priority: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the k[row] highest-priority candidates of every row (k may differ per row)."""
    priority = priority.masked_fill(~candidates, float("-inf"))
    order = priority.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return candidates & (rank < k.unsqueeze(-1))


def choose_positions(alg, is_mask, count, ratio, confidence, alg_temp, generator=None) -> torch.Tensor:
    """Which masked positions a row commits at this step.

    `count` (per row) positions: `origin` uniformly at random, confidence algorithms the most confident (or,
    with `alg_temp` > 0, drawn without replacement from softmax(confidence / alg_temp), by the Gumbel top-k
    trick). `autoregressive` commits exactly one position, the leftmost mask, whatever `count` is (the original
    decoder's rule, on the last step too: with fewer steps than masks and no confidence threshold the answer
    keeps masks, which `decode_answers` drops). `origin-ratio` instead commits each masked position
    independently with probability `ratio` (per row).
    """
    if alg == "origin-ratio":
        draw = torch.rand(is_mask.shape, device=is_mask.device, generator=generator)
        return is_mask & (draw < ratio.unsqueeze(-1))
    if alg == "origin":
        priority = torch.rand(is_mask.shape, device=is_mask.device, generator=generator)
    elif alg == "autoregressive":  # as the original decoder: the leftmost mask alone, whatever the count
        priority = -torch.arange(is_mask.shape[-1], device=is_mask.device, dtype=torch.float32).expand(is_mask.shape)
        count = torch.ones_like(count)
    elif alg_temp:
        uniform = torch.rand(is_mask.shape, device=is_mask.device, generator=generator)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
        priority = (confidence / alg_temp).masked_fill(~is_mask, float("-inf")).log_softmax(dim=-1) + gumbel
    else:
        priority = confidence
    return top_k_per_row(priority.float(), is_mask, count)


def schedule_points(eps: float, steps: int, device=None) -> torch.Tensor:
    """τ = linspace(1, eps, steps + 1) in float64 (the fraction of masks left after each step)."""
    return torch.linspace(1, eps, steps + 1, dtype=torch.float64, device=device)


def plan_blocks(canvas_len: int, block_length: Optional[int], steps: int) -> list:
    """(start, end, steps) of each block, decoded left to right; `steps` is shared out evenly (the first
    blocks take the remainder). Without `block_length` the whole canvas is one block."""
    block_length = block_length or canvas_len
    n_blocks = canvas_len // block_length
    return [
        (i * block_length, (i + 1) * block_length, steps // n_blocks + (i < steps % n_blocks))
        for i in range(n_blocks)
    ]


class DimPipeline:
    """Dimple's decoding: confident decoding, then a ratio schedule over the masks left; early exit."""

    early_exit = True
    original_confidence_allowed = True

    def __init__(self, config, steps: int, device=None):
        self.config, self.steps = config, steps
        self.taus = schedule_points(config.eps, steps, device)

    def schedule(self, step: int, masks_left: torch.Tensor, masks_start: torch.Tensor):
        """(count, ratio) per row. With r = masks_left / masks_start, take the first schedule point s ≥ step+1
        with τ_s < r and floor(masks_left·(1 − τ_s/r)) ≥ 1; all remaining at the last point or once r ≤ eps."""
        taus = self.taus[step + 1 :]  # float64
        left = masks_left.double()
        r = left / masks_start.double().clamp_min(1)
        ratio = 1 - taus[None, :] / r.clamp_min(1e-30)[:, None]
        counts = torch.floor(left[:, None] * ratio)
        valid = (taus[None, :] < r[:, None]) & (counts >= 1)
        valid[:, -1] = True
        first = valid.int().argmax(dim=-1, keepdim=True)  # first valid schedule point
        count = counts.gather(-1, first).squeeze(-1)
        ratio = ratio.gather(-1, first).squeeze(-1)
        take_all = (first.squeeze(-1) == taus.shape[0] - 1) | (r <= self.config.eps)
        count = torch.where(take_all, left, count)
        ratio = torch.where(take_all, torch.ones_like(ratio), ratio)
        return count.long(), ratio.float()

    def commit(self, step, is_mask, masks_start, confidence, generator):
        config = self.config
        last_step = step == self.steps - 1
        count, ratio = self.schedule(step, is_mask.sum(-1), masks_start)
        chosen = choose_positions(config.alg, is_mask, count, ratio, confidence, config.alg_temp, generator)
        if config.alg_p_threshold:
            confident = is_mask & (confidence > config.alg_p_threshold) if not last_step else is_mask
            chosen = torch.where(confident.any(-1, keepdim=True), confident, chosen)
        return chosen


class DreamPipeline:
    """Dream's decoding: step i moves from t = τ_i to s = τ_{i+1}; always runs every step."""

    early_exit = False
    original_confidence_allowed = False

    def __init__(self, config, steps: int, device=None):
        self.config, self.steps = config, steps
        self.taus = schedule_points(config.eps, steps).tolist()  # Python floats: no device sync per step

    def commit(self, step, is_mask, masks_start, confidence, generator):
        config = self.config
        t, s = self.taus[step], self.taus[step + 1]
        last_step = step == self.steps - 1
        ratio = 1.0 if last_step else 1 - s / t
        masks_left = is_mask.sum(-1)
        count = masks_left if last_step else torch.floor(masks_left.double() * ratio).long()
        ratio = torch.full(is_mask.shape[:1], ratio, device=is_mask.device)
        alg = "origin-ratio" if config.alg in ("origin", "origin-ratio") else config.alg
        return choose_positions(alg, is_mask, count, ratio, confidence, config.alg_temp, generator)


class DenoisingForward:
    """The model call of one denoising step, returning the final hidden states that predict the canvas
    positions `[lo, hi)` (the block being decoded; the whole canvas without blocks): `hidden[:, j]` predicts
    canvas position `lo + j` (it is the hidden state one position earlier). The head is left to the caller,
    which applies it only where logits are needed.

    Holds what does not change across steps: the prompt embeddings (images encoded once) in a buffer whose
    tail receives the canvas embeddings, the positions and the attention mask. Every pass is the same call
    on a different set of query positions, passed to the model explicitly (`cache_position`):

    * full: every position (every step without a cache; the first step, which fills the cache);
    * tail: the last prompt token and the canvas, the prompt's keys/values read from the cache (prefilling);
    * window: the position before the block and the block, everything else read from the cache (the dual
      cache of block-wise decoding; the cache is refreshed by a full or tail pass at each block's first step).

    Tail and window passes have fixed shapes: on CUDA each is captured once as a CUDA graph and replayed; their
    positions are device tensors, rewritten in place when a new block starts.
    """

    def __init__(self, model, prompt_embeds, position_ids, attn_mask, canvas_len, block_length,
                 use_cache, dual_cache, use_cuda_graph, use_torch_compile=False):
        batch, prompt_len, hidden = prompt_embeds.shape
        device = prompt_embeds.device
        total, block = prompt_len + canvas_len, block_length or canvas_len
        self.model, self.prompt_len, self.block = model, prompt_len, block
        self.embeds = prompt_embeds.new_empty(batch, total, hidden)
        self.embeds[:, :prompt_len] = prompt_embeds
        self.canvas = torch.empty(batch, canvas_len, dtype=torch.long, device=device)
        self.position_ids, self.attn_mask = position_ids, attn_mask
        self.cache = model.new_prefix_cache(total) if use_cache or dual_cache else None
        self.cache_filled = False
        self.freeze_prompt, self.dual_cache = use_cache, dual_cache
        first = prompt_len - 1  # the last prompt token's query predicts the first canvas position
        self.queries = {
            "full": torch.arange(total, device=device),
            "tail": torch.arange(first, total, device=device),
            "window": torch.arange(first, first + block + 1, device=device),
        }
        # Which outputs of a cached pass predict the block: the tail's move with the block (a device tensor),
        # the window's are its first `block` (its last token predicts past the block).
        self.keep = {
            "tail": slice(0, canvas_len) if block == canvas_len else torch.arange(block, device=device),
            "window": slice(0, block),
        }
        self.block_start = 0
        self.use_cuda_graph = use_cuda_graph
        self.graphs = {}
        # The repeated passes may run compiled; the full pass runs once per decode (or block), eagerly.
        self.compiled, self.cache_marked = use_torch_compile, False
        self.cached_forward = compiled_decoder(model) if use_torch_compile else model.decoder_forward

    def __call__(self, canvas: torch.Tensor, lo: int, hi: int, first_step_of_block: bool) -> torch.Tensor:
        self.canvas.copy_(canvas)
        if lo != self.block_start:
            self.block_start = lo
            self.queries["window"].copy_(self.queries["window"] - self.queries["window"][0] + self.prompt_len - 1 + lo)
            if torch.is_tensor(self.keep["tail"]):
                self.keep["tail"].copy_(torch.arange(lo, hi, device=self.canvas.device))
        if self.cache is None or not self.cache_filled or (
            self.dual_cache and first_step_of_block and not self.freeze_prompt
        ):
            self.cache_filled = self.cache is not None
            first = self.prompt_len - 1
            return self._pass("full", slice(first + lo, first + hi))
        kind = "window" if self.dual_cache and not first_step_of_block else "tail"
        return self._replay(kind)

    def _pass(self, kind: str, keep) -> torch.Tensor:
        """Embed the current canvas and run the query positions of `kind`; the outputs that predict the block."""
        queries = self.queries[kind]
        self.embeds[:, self.prompt_len :] = self.model.get_input_embeddings()(self.canvas)
        inputs = dict(
            inputs_embeds=self.embeds.index_select(1, queries),
            attention_mask=None if self.attn_mask is None else self.attn_mask.index_select(2, queries),
            position_ids=self.position_ids.index_select(2, queries),
            past_key_values=self.cache,
            cache_position=None if self.cache is None else queries,
        )
        if kind == "full":
            return self.model.decoder_forward(**inputs)[0][:, keep]
        if self.compiled:
            self._mark_dynamic(inputs)
        return self.cached_forward(**inputs)[0][:, keep]

    def _mark_dynamic(self, inputs: dict) -> None:
        """The batch and the cached length change from one request to the next; the pass's own length (the
        canvas, or a block) is fixed by the settings. Declared dynamic up front, each kind of pass compiles
        once for batch 1 and once for larger batches, instead of once per shape (which reaches torch.compile's
        recompile limit after a few prompts, and then runs eager)."""
        dynamic_dims = [(inputs["inputs_embeds"], (0,)), (inputs["attention_mask"], (0, 3)), (inputs["position_ids"], (1,))]
        if not self.cache_marked:  # the cache's tensors live for the whole decode: marked once
            self.cache_marked = True
            dynamic_dims += [(kv, (0, 1)) for kv in self.cache.key_values]  # (batch, keys, 2 * kv_heads, dim)
        for tensor, dims in dynamic_dims:
            for dim in dims if tensor is not None else ():
                torch._dynamo.maybe_mark_dynamic(tensor, dim)

    def _replay(self, kind: str) -> torch.Tensor:
        """Run a cached pass, or on CUDA its captured graph (captured at the first call)."""
        step = functools.partial(self._pass, kind, self.keep[kind])
        if self.use_cuda_graph and kind not in self.graphs:
            self._capture(kind, step)
        if kind in self.graphs:
            graph, hidden = self.graphs[kind]
            graph.replay()
            return hidden
        return step()

    def _capture(self, kind: str, step: Callable[[], torch.Tensor]) -> None:
        """Record a fixed-shape pass. The warm-up and capture runs write only the keys/values that this pass
        rewrites at every call anyway; on any capture failure decoding continues uncaptured."""
        device = self.canvas.device
        try:
            stream = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # allocator and library handles settle before capture
                    step()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                hidden = step()
            self.graphs[kind] = (graph, hidden)
        except RuntimeError as error:  # e.g. an attention kernel that cannot be captured
            warnings.warn(f"CUDA graph capture failed, decoding without it: {error}")
            self.use_cuda_graph = False


# model class -> torch.compile of its decoder_forward (holding no model: nothing is kept alive)
_COMPILED_DECODERS = {}


def compiled_decoder(model) -> Callable:
    """`model.decoder_forward` through `torch.compile`, built once per model class and reused by every decode
    (the model is an argument, so a copy of the model runs its own weights)."""
    cls = type(model)
    if cls not in _COMPILED_DECODERS:
        _COMPILED_DECODERS[cls] = torch.compile(cls.decoder_forward)
    return functools.partial(_COMPILED_DECODERS[cls], model)


class SettledTextStream:
    """Feeds one of transformers' text streamers (`TextStreamer`, `TextIteratorStreamer`), which expect each
    token once, in order: the prompt first (what `skip_prompt` drops), then the answer's tokens as they settle,
    that is the committed tokens left of the first mask, up to the first end-of-text."""

    def __init__(self, streamer, prompt: torch.Tensor, mask_id: int, end_ids: torch.Tensor):
        self.streamer, self.mask_id, self.end_ids, self.sent = streamer, mask_id, end_ids, 0
        streamer.put(prompt.cpu())

    def put(self, canvas: torch.Tensor) -> None:
        row = canvas[0]
        # the first mask or end-of-text (a sentinel past the end when there is none): one host sync
        unsettled = F.pad((row == self.mask_id) | torch.isin(row, self.end_ids), (0, 1), value=True)
        settled = int(unsettled.int().argmax())
        if settled > self.sent:
            self.streamer.put(row[self.sent : settled].cpu())
            self.sent = settled

    def end(self) -> None:
        self.streamer.end()


def hook_result(name: str, result, expected: torch.Tensor) -> torch.Tensor:
    """What a decoding hook returned, checked to be a tensor like the one it was given (a hook that forgets
    to return it would otherwise fail deep in the next step)."""
    if (  # a hook may return logits in another float dtype; token ids must stay integers
        not torch.is_tensor(result) or result.shape != expected.shape
        or result.dtype.is_floating_point != expected.dtype.is_floating_point
    ):
        got = f"{result.dtype} of shape {tuple(result.shape)}" if torch.is_tensor(result) else type(result).__name__
        raise ValueError(f"`{name}` must return a {expected.dtype} tensor of shape {tuple(expected.shape)}, got {got}")
    return result


def end_of_text_ids(config, device) -> torch.Tensor:
    """The tokens that end an answer: the padding token and every end-of-sequence id."""
    return torch.tensor(sorted({config.pad_token_id, *_as_list(config.eos_token_id)} - {None}), device=device)


def fill_after_end_of_text(canvas: torch.Tensor, mask_token_id: Optional[int], end_ids: torch.Tensor, fill_id: int):
    """Positions after a row's first end-of-text token become `fill_id`: the answer has ended there. With a
    `mask_token_id`, only its masks (while decoding: committed tokens never change); with None, every later
    position (the finished sequence transformers' `generate` returns)."""
    ended = torch.isin(canvas, end_ids).cummax(dim=-1).values
    after_end = F.pad(ended[:, :-1], (1, 0))  # the first end-of-text itself stays
    replace = after_end if mask_token_id is None else after_end & (canvas == mask_token_id)
    return canvas.masked_fill(replace, fill_id)


# --------------------------------------------------------------------------------------------------
# The mixin
# --------------------------------------------------------------------------------------------------


class DimpleGenerationMixin(GenerationMixin):
    """Gives `DimpleModel` `diffusion_generate` (and routes `generate` to it). Subclassing transformers'
    `GenerationMixin` makes `from_pretrained` load the checkpoint's generation_config.json."""

    @classmethod
    def can_generate(cls) -> bool:
        # Makes `from_pretrained` load generation_config.json on every transformers version.
        return True

    @property
    def generation_config(self) -> Optional[DimpleGenerationConfig]:
        return self.__dict__.get("_held_generation_config")

    @generation_config.setter
    def generation_config(self, config) -> None:
        """Held as a `DimpleGenerationConfig` with the fields the given one sets: transformers loads
        generation_config.json as a plain `GenerationConfig`, whose checks (run when the model is saved) refuse
        `temperature=0.0` without sampling, which is greedy decoding here."""
        if config is not None and not isinstance(config, DimpleGenerationConfig):
            config = DimpleGenerationConfig(**fields_set_by(config))
        self.__dict__["_held_generation_config"] = config

    def _dimple_generation_config(self, generation_config, kwargs) -> DimpleGenerationConfig:
        """The decode's settings: the checkpoint's generation config, overlaid with the fields the given one sets
        (as transformers 5 merges them), then the keyword arguments named in `SETTINGS`, which are popped from
        `kwargs` (what is left there is not a setting)."""
        if isinstance(generation_config, dict):
            generation_config = DimpleGenerationConfig(**generation_config)
        elif generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise ValueError(
                f"`generation_config` must be a GenerationConfig, a dict of its fields, or None; got "
                f"{type(generation_config).__name__}"
            )
        values = {}
        for source in (getattr(self, "generation_config", None), generation_config):
            if source is not None:
                values.update(fields_set_by(source))
        config = DimpleGenerationConfig(**values)
        if config.do_sample and not config.temperature:  # transformers' switch: its default sampling temperature
            config.temperature = 1.0
        if "max_length" in kwargs and "max_new_tokens" not in kwargs:
            config.max_new_tokens = None  # an explicit max_length replaces the default answer length
        do_sample, temperature_given = kwargs.pop("do_sample", None), "temperature" in kwargs
        for key in SETTINGS:
            if key in kwargs:
                setattr(config, key, kwargs.pop(key))
        if do_sample is not None:  # transformers' switch; here sampling is temperature > 0
            if not isinstance(do_sample, bool):
                raise ValueError(f"`do_sample` must be True or False, got {do_sample!r}")
            if temperature_given and isinstance(config.temperature, (int, float)) and (config.temperature > 0) != do_sample:
                raise ValueError(
                    f"`do_sample={do_sample}` contradicts `temperature={config.temperature}`: sampling is "
                    "temperature > 0, greedy decoding temperature 0 (`do_sample` can be left out)"
                )
            if not temperature_given:  # greedy, or transformers' default sampling temperature
                config.temperature = (config.temperature or 1.0) if do_sample else 0.0
            config.do_sample = do_sample
        if config.mask_token_id is None:
            config.mask_token_id = getattr(self.config, "mask_token_id", None)
        if config.eos_token_id is None:
            config.eos_token_id = self.config.eos_token_id
        if config.pad_token_id is None:  # what fills an ended answer: the padding token, else end-of-text
            config.pad_token_id = next(iter(_as_list(self.config.pad_token_id) + _as_list(config.eos_token_id)), None)
        return config

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`diffusion_generate` for generic callers, with what they expect of transformers' `generate`: each row
        ends at its first end-of-text, the later positions holding the padding token (a diffusion canvas can
        have tokens committed after it), so `batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)`
        is the answer."""
        prompt = inputs if torch.is_tensor(inputs) else (dict(inputs) if inputs is not None else kwargs).get("input_ids")
        settings = self._dimple_generation_config(generation_config, dict(kwargs))
        out = self.diffusion_generate(inputs, generation_config, **kwargs)
        sequences = out.sequences if isinstance(out, DimpleGenerationOutput) else out
        if torch.is_tensor(prompt):
            end_ids = end_of_text_ids(settings, sequences.device)
            answer = sequences[:, prompt.shape[1] :]
            sequences[:, prompt.shape[1] :] = fill_after_end_of_text(answer, None, end_ids, settings.pad_token_id)
        return out

    @torch.no_grad()
    def diffusion_generate(
        self,
        inputs: Optional[Union[torch.LongTensor, dict]] = None,
        generation_config: Optional[GenerationConfig] = None,
        **kwargs,
    ) -> Union[torch.LongTensor, DimpleGenerationOutput]:
        r"""Generate answers by iterative parallel unmasking.

        Args:
            inputs (`torch.LongTensor` of shape `(batch, prompt)` or a processor output): the prompt ids
                (left-padded in a batch). A dict / `BatchFeature` is unpacked into the keyword arguments.
            generation_config (`GenerationConfig`, *optional*): defaults to the checkpoint's
                `generation_config.json`; keyword arguments override single fields.
            attention_mask, pixel_values, image_grid_thw: the processor outputs.
            max_new_tokens / max_length, steps, eps, temperature, top_p, top_k, alg, alg_temp,
            alg_p_threshold, use_original_confidence, decoding_pipeline, use_cache, block_length, dual_cache,
            stop_at_eos, use_cuda_graph, use_torch_compile, output_history, return_dict_in_generate,
            num_return_sequences, mask_token_id, pad_token_id, eos_token_id: see `DimpleGenerationConfig` and the
            model card.
            response_prior (`str`, `list[int]`, 1-D or `(batch, length)` tensor, *optional*): the start of the
                answer canvas, fixed; mask tokens in it are generated, other tokens never change, and an
                end-of-text at position k ends the answer there. A string needs `tokenizer=`.
            generation_tokens_hook_func (`Callable[[step, x, logits], x]`, *optional*): called with step None
                before the first step, then after every step; may rewrite the answer positions of the sequences
                `x` (the prompt is encoded once, before the first step: edits to it do not reach the model).
            generation_logits_hook_func (`Callable[[step, x, logits], logits]`, *optional*): may rewrite the
                logits of a step. The logits passed to both hooks are those of the answer canvas,
                `(batch, max_new_tokens, vocab)`: `logits[:, j]` predicts `x[:, prompt_length + j]`; with
                `block_length`, those of the current block, `logits[:, j]` predicting `x[:, prompt_length + start + j]`.
                Without hooks the head runs only at the masked positions, the ones a step scores; with a hook
                it runs at every position of the block (same tokens, sampled ones included).
            streamer (`BaseStreamer`, *optional*): `put` receives the answer canvases `(batch, max_new_tokens)`
                after every step, `end` is called at the end (also on an error). transformers' `TextStreamer` /
                `TextIteratorStreamer` (batch 1) receive the prompt, then the answer's tokens as they settle
                (those left of the first mask, up to the end-of-text), each once.
            generator (`torch.Generator`, *optional*): random source for sampling.

        Returns:
            `torch.LongTensor` `(batch * num_return_sequences, prompt + max_new_tokens)`, or a
            `DimpleGenerationOutput` with `return_dict_in_generate=True`.
        """
        if isinstance(inputs, dict) or hasattr(inputs, "data") and isinstance(getattr(inputs, "data"), dict):
            kwargs = {**dict(inputs), **kwargs}
            inputs = None
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("`inputs` (the prompt's input_ids) is required")
        attention_mask = kwargs.pop("attention_mask", None)
        pixel_values = kwargs.pop("pixel_values", None)
        image_grid_thw = kwargs.pop("image_grid_thw", None)
        tokens_hook = kwargs.pop("generation_tokens_hook_func", None)
        logits_hook = kwargs.pop("generation_logits_hook_func", None)
        streamer = kwargs.pop("streamer", None)
        generator = kwargs.pop("generator", None)
        response_prior = kwargs.pop("response_prior", None)
        tokenizer = kwargs.pop("tokenizer", None)
        config = self._dimple_generation_config(generation_config, kwargs)
        return_dict = config.return_dict_in_generate
        if kwargs:
            raise ValueError(
                f"unknown arguments to diffusion_generate: {sorted(kwargs)}; its settings are {list(SETTINGS)} "
                "(autoregressive options such as num_beams or repetition_penalty do not apply to diffusion)"
            )

        # ---- validate everything before any forward pass
        if not torch.is_tensor(input_ids) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"`inputs` must be a tensor of token ids (torch.long), got {type(input_ids).__name__}"
                             + (f" of {input_ids.dtype}" if torch.is_tensor(input_ids) else ""))
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"`inputs` must be (batch, prompt) token ids, prompt >= 1, got shape {tuple(input_ids.shape)}")
        prompt_len = input_ids.shape[1]
        if attention_mask is not None:
            if not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"`attention_mask` must be a tensor of the prompt's shape {tuple(input_ids.shape)}, got "
                    + (f"shape {tuple(attention_mask.shape)}" if torch.is_tensor(attention_mask) else type(attention_mask).__name__)
                )
            # Left padding only: the answer canvas follows the last prompt token of every row.
            if bool((attention_mask[:, 1:].long() < attention_mask[:, :-1].long()).any()):
                raise ValueError("`attention_mask` must be left-padded (zeros before a row's tokens, none after)")
        if config.max_length is not None and not _is_int(config.max_length):
            raise ValueError(f"`max_length` must be an integer, got {config.max_length!r}")
        if config.max_new_tokens is None:
            if config.max_length is None or config.max_length - prompt_len < 1:
                raise ValueError(
                    f"`max_new_tokens` must be >= 1: the prompt ({prompt_len} tokens) is already at "
                    f"`max_length` ({config.max_length}); set `max_new_tokens` or a larger `max_length`"
                )
            config.max_new_tokens = config.max_length - prompt_len
        check_generation_config(config)
        vocab_size = self.get_input_embeddings().num_embeddings
        if config.mask_token_id >= vocab_size:
            raise ValueError(f"`mask_token_id` must be a token id < the vocabulary size {vocab_size}, got {config.mask_token_id}")
        mask_id = config.mask_token_id
        if attention_mask is None and input_ids.shape[0] > 1 and bool((input_ids[:, 0] == config.pad_token_id).any()):
            raise ValueError("the batch is padded (a row starts with pad_token_id): pass its `attention_mask`")
        if config.use_cache and bool((input_ids == mask_id).any()):
            raise ValueError(
                "the prompt contains mask tokens, which prefilling (`use_cache=True`) would freeze: use "
                "`use_cache=False`, or put answer masks in `response_prior`"
            )
        prior = self._response_prior(response_prior, tokenizer, input_ids, config)
        if isinstance(streamer, TextStreamer) and input_ids.shape[0] * config.num_return_sequences != 1:
            raise ValueError(
                "`streamer`: transformers' text streamers follow one answer (batch 1, num_return_sequences 1), got "
                f"{input_ids.shape[0] * config.num_return_sequences}; use a streamer whose `put` takes the canvases"
            )

        # ---- the sequence, positions and masks: built once
        n_rep = config.num_return_sequences
        device = input_ids.device
        canvas_len = config.max_new_tokens
        batch = input_ids.shape[0] * n_rep
        total_len = prompt_len + canvas_len
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        full_mask = None
        if attention_mask is not None:
            full_mask = F.pad(attention_mask.long(), (0, canvas_len), value=1).repeat_interleave(n_rep, 0)
        x = torch.full((batch, total_len), mask_id, dtype=torch.long, device=device)
        x[:, :prompt_len] = input_ids.repeat_interleave(n_rep, 0)
        if prior is not None:
            if prior.shape[0] not in (1, batch):  # one row per prompt: repeat it for the prompt's answers
                prior = prior.repeat_interleave(n_rep, 0)
            x[:, prompt_len : prompt_len + prior.shape[1]] = prior  # a single row broadcasts to every row
        end_ids = end_of_text_ids(config, device)
        x[:, prompt_len:] = fill_after_end_of_text(x[:, prompt_len:], mask_id, end_ids, config.pad_token_id)

        position_ids, _ = self.get_rope_index(
            F.pad(input_ids, (0, canvas_len), value=mask_id),
            image_grid_thw,
            attention_mask=None if attention_mask is None else F.pad(attention_mask, (0, canvas_len), value=1),
        )
        position_ids = position_ids.repeat_interleave(n_rep, 1)
        embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw)  # images encoded once
        denoise = DenoisingForward(
            self, embeds.repeat_interleave(n_rep, 0), position_ids,
            self.prepare_attention_mask(full_mask, total_len, total_len), canvas_len, config.block_length,
            use_cache=config.use_cache, dual_cache=config.dual_cache,
            use_cuda_graph=config.use_cuda_graph and device.type == "cuda", use_torch_compile=config.use_torch_compile,
        )
        pipeline_class = DimPipeline if config.decoding_pipeline == "dim" else DreamPipeline
        original_confidence = config.use_original_confidence and pipeline_class.original_confidence_allowed

        if isinstance(streamer, TextStreamer):  # transformers' text streamers: the answer as it settles
            streamer = SettledTextStream(streamer, input_ids[0], mask_id, end_ids)
        try:
            # q/k/v as one matrix product per layer while decoding (a stacked copy of their weights, freed after).
            with self.stacked_qkv_projections():
                if tokens_hook is not None:
                    x = hook_result("generation_tokens_hook_func", tokens_hook(None, x, None), x)
                    # an end-of-text the hook wrote ends the answer there, as one in `response_prior` does
                    x[:, prompt_len:] = fill_after_end_of_text(x[:, prompt_len:], mask_id, end_ids, config.pad_token_id)
                history = [] if config.output_history else None
                forward_passes = 0
                for lo, hi, block_steps in plan_blocks(canvas_len, config.block_length, config.steps):
                    pipeline = pipeline_class(config, block_steps, device)
                    block = slice(prompt_len + lo, prompt_len + hi)
                    masks_start = (x[:, block] == mask_id).sum(-1)
                    for step in range(block_steps):
                        is_mask = x[:, block] == mask_id
                        # The one host sync of a step: which positions are masked (flat indices into the block).
                        masked = is_mask.flatten().nonzero().squeeze(-1)
                        if pipeline.early_exit and masked.numel() == 0:
                            break
                        hidden = denoise(x[:, prompt_len:], lo, hi, first_step_of_block=step == 0)
                        forward_passes += 1
                        logits = None
                        if tokens_hook is not None or logits_hook is not None:  # hooks see the whole block's logits
                            logits = self.lm_head(hidden)
                            if logits_hook is not None:
                                logits = hook_result("generation_logits_hook_func", logits_hook(forward_passes - 1, x, logits), logits)
                            masked_logits = logits.flatten(0, 1).index_select(0, masked.to(logits.device))
                        else:  # the head only where a token is scored
                            masked_logits = self.lm_head(hidden.flatten(0, 1).index_select(0, masked.to(hidden.device)))
                        tokens, confidence = scatter_scores(
                            *score_positions(masked_logits, config, original_confidence, generator), masked, x[:, block]
                        )
                        chosen = pipeline.commit(step, is_mask, masks_start, confidence, generator)
                        x[:, block] = torch.where(chosen, tokens, x[:, block])
                        if config.stop_at_eos:
                            answer = x[:, prompt_len:]
                            x[:, prompt_len:] = fill_after_end_of_text(answer, mask_id, end_ids, config.pad_token_id)
                        if tokens_hook is not None:
                            x = hook_result("generation_tokens_hook_func", tokens_hook(forward_passes - 1, x, logits), x)
                        if history is not None:
                            history.append(x.clone())
                        if streamer is not None:
                            streamer.put(x[:, prompt_len:].clone())
        finally:  # also on an error, so that a consumer of TextIteratorStreamer is not left waiting
            if streamer is not None:
                streamer.end()
        if return_dict:
            return DimpleGenerationOutput(
                sequences=x, history=tuple(history) if history is not None else None, num_forward_passes=forward_passes
            )
        return x

    def _response_prior(self, prior, tokenizer, input_ids, config) -> Optional[torch.Tensor]:
        """The response prior as a (1 or batch, length) tensor of ids on the prompt's device."""
        if prior is None:
            return None
        if isinstance(prior, str):
            if tokenizer is None:
                raise ValueError("a string `response_prior` needs `tokenizer=` (the processor or its tokenizer)")
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
            prior = tokenizer(prior, add_special_tokens=False)["input_ids"]
        prior = torch.as_tensor(prior, dtype=torch.long, device=input_ids.device)
        if prior.dim() == 1:
            prior = prior.unsqueeze(0)
        if prior.dim() != 2 or prior.shape[0] not in (1, input_ids.shape[0], input_ids.shape[0] * config.num_return_sequences):
            raise ValueError(
                f"`response_prior` must be a string, a list of ids, or a (batch, length) tensor; got shape "
                f"{tuple(prior.shape)} for a batch of {input_ids.shape[0]}"
            )
        vocab_size = self.get_input_embeddings().num_embeddings
        if prior.numel() and not (0 <= int(prior.min()) and int(prior.max()) < vocab_size):
            raise ValueError(f"`response_prior` holds ids outside the vocabulary [0, {vocab_size})")
        if prior.shape[1] > config.max_new_tokens:
            raise ValueError(
                f"`response_prior` has {prior.shape[1]} tokens, more than `max_new_tokens` ({config.max_new_tokens})"
            )
        return prior


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
