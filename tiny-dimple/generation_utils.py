"""Diffusion decoding for Dimple (`diffusion_generate`).

The answer is a canvas of mask tokens appended to the prompt. Every step runs the model once, scores every
masked position (a sampled or greedy token and a confidence), and commits some of them; committed tokens never
change. `diffusion_generate` runs in three phases:

1. validate: the settings (`DimpleGenerationConfig.validate`) and the inputs, before any forward pass;
2. prepare: the canvas, positions, attention mask and the `DenoisingForward` that runs the model, with `alg`
   resolved once into a `PositionScorer` (token and confidence) and a `PositionChooser` (which positions);
3. the loop: for each block (`plan_blocks`; the whole canvas without `block_length`) and step, one forward
   pass, scoring of the masked positions, and a pipeline (`DimPipeline`, `DreamPipeline`) that decides how
   many positions each row commits.

All decisions are per row, so a row's answer does not depend on the rest of the batch. Inside a step the only
host synchronisation is reading which positions are masked (it also carries the previous step's check for
non-finite logits and out-of-vocabulary ids), which ends decoding once nothing is masked.
"""

import functools
import math
import sys
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
    "use_torch_compile", "return_dict_in_generate", "open_ended", "output_scores", "output_logits", "credit_decoding",
)
# The settings `diffusion_generate` takes as keyword arguments (besides the inputs, hooks, streamer, generator,
# stopping criteria, response prior and tokenizer). Other `GenerationConfig` fields (num_beams,
# repetition_penalty, ...) are autoregressive and would be silently ignored: they are refused.
SETTINGS = (
    "max_new_tokens", "max_length", "steps", "eps", "temperature", "top_p", "top_k", "alg", "alg_temp",
    "alg_p_threshold", "use_original_confidence", "decoding_pipeline", "use_cache", "block_length", "dual_cache",
    "stop_at_eos", "use_cuda_graph", "use_torch_compile", "output_history", "return_dict_in_generate",
    "num_return_sequences", "mask_token_id", "pad_token_id", "eos_token_id", "do_sample", "open_ended",
    "output_scores", "output_logits", "parallel_factor", "credit_decoding", "commit_when_stable",
)
# Open-ended decoding without `block_length`: blocks of this many positions (Fast-dLLM's and LLaDA's 32). With one
# block of masks in view past it, the tiny model sees a 64-position canvas at first, close to the 48 it was
# trained on; two blocks in view (96) or a fixed 256 canvas make it write wrong descriptions (docs/decoding.md).
OPEN_ENDED_BLOCK_LENGTH = 32
MIN_TEMPERATURE = 1e-6
# What generic callers (pipelines, evaluation harnesses written for `generate`) pass that changes nothing here:
# accepted and dropped. Other values of these arguments would change an autoregressive result and are refused.
NEUTRAL_ARGUMENTS = {
    "num_beams": 1, "num_beam_groups": 1, "repetition_penalty": 1.0, "length_penalty": 1.0,
    "no_repeat_ngram_size": 0, "videos": [], "pixel_values_videos": None, "video_grid_thw": None,
}
# Bounds that keep a mistyped setting from allocating gigabytes or running for hours.
MAX_STEPS = 16384
MAX_ROWS = 1024  # batch x num_return_sequences


def _is_int(value) -> bool:  # a bool is an int to Python, but `steps=True` is a mistake
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


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
            through `torch.compile`, which fuses the small element-wise kernels (rotary, residual adds, casts).
            The first decodes pay the compilation.
        parallel_factor (`float`, *optional*): Fast-dLLM's factor-based parallel decoding (`dim`), in place of
            `alg_p_threshold`: commit the n most confident masks, n the largest count whose k-th confidence is at
            least 1 - factor / (k + 1) for every k <= n (always at least one). Larger factors commit more.
        credit_decoding (`bool`, defaults to `False`): CreditDecoding's trace credit (`dim`, `maskgit_plus`): a
            position whose top token stays the same across passes accumulates credit c = gamma * c + p^alpha, and
            its confidence becomes the token's probability with its logit raised by lambda * log(1 + c)
            (gamma 0.65, lambda 0.7, alpha 0.5, the paper's); the threshold or factor rule then reads it.
        commit_when_stable (`int`, *optional*): commit every mask of a row whose predicted tokens at its masks
            have not changed for this many passes in a row (an early commit once the draft is settled).
        open_ended (`bool`, defaults to `False`): `max_new_tokens` is an upper bound, not the canvas: the canvas
            grows a block of `block_length` masks at a time (`OPEN_ENDED_BLOCK_LENGTH` when unset, the last
            block shorter when it does not divide the bound), each block denoised with the settled text before it
            and one block of masks after it in view, the settled blocks' keys/values read from the cache
            (`use_cache`); a row ends at its first end-of-text (`stop_at_eos` is implied) and decoding ends when
            every row has. Each block takes its share of `steps` as in block-wise decoding of the bound.
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
        self.open_ended = kwargs.pop("open_ended", False)
        self.parallel_factor = kwargs.pop("parallel_factor", None)
        self.credit_decoding = kwargs.pop("credit_decoding", False)
        self.commit_when_stable = kwargs.pop("commit_when_stable", None)
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
        self.output_scores, self.output_logits = bool(self.output_scores), bool(self.output_logits)

    def validate(self, *args, **kwargs):
        """Raise a `ValueError` naming the setting and its allowed values for anything out of range. Token ids
        left None are filled in from the model's config when decoding (and checked again then). Replaces the base
        class's checks, which are about autoregressive sampling; transformers calls it as the config is built,
        updated and saved."""

        def fail(name, allowed, value):
            raise ValueError(f"`{name}` must be {allowed}, got {value!r}")

        for flag in BOOLEAN_FLAGS:  # a string such as "false" would otherwise switch the option on
            value = getattr(self, flag, False)
            # transformers leaves these None while the config is built
            if not isinstance(value, bool) and not (value is None and flag in (
                    "return_dict_in_generate", "output_scores", "output_logits")):
                fail(flag, "True or False", value)
        if self.alg not in ALGORITHMS:
            fail("alg", f"one of {ALGORITHMS}", self.alg)
        if self.decoding_pipeline not in PIPELINES:
            fail("decoding_pipeline", f"one of {PIPELINES}", self.decoding_pipeline)
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            fail("steps", f"an integer from 1 to {MAX_STEPS}", self.steps)
        if self.max_new_tokens is not None and (not _is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            fail("max_new_tokens", "an integer >= 1", self.max_new_tokens)
        if self.max_length is not None and not _is_int(self.max_length):
            fail("max_length", "an integer", self.max_length)
        if self.alg_p_threshold is not None and not (_is_real(self.alg_p_threshold) and 0 <= self.alg_p_threshold <= 1):
            fail("alg_p_threshold", "a number in [0, 1] (or None)", self.alg_p_threshold)
        if self.top_p is not None and not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            fail("top_p", "a number in (0, 1] (or None)", self.top_p)
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            fail("top_k", "an integer >= 1 (or None)", self.top_k)
        temperature = 0.0 if self.temperature is None else self.temperature  # None: greedy
        if not (_is_real(temperature) and (temperature == 0 or temperature >= MIN_TEMPERATURE)):
            # below it, sampling is greedy in effect and the scaled logits can overflow to inf (NaN probabilities)
            fail("temperature", f"0 (greedy) or a number >= {MIN_TEMPERATURE}", temperature)
        if not (_is_real(self.eps) and 0 < self.eps < 1):
            fail("eps", "a number in (0, 1)", self.eps)
        if self.alg_temp is not None and not (_is_real(self.alg_temp) and self.alg_temp >= 0):
            fail("alg_temp", "a number >= 0 (or None)", self.alg_temp)
        rows = self.num_return_sequences
        if rows is not None and (not _is_int(rows) or not 1 <= rows <= MAX_ROWS):
            fail("num_return_sequences", f"an integer from 1 to {MAX_ROWS}", rows)
        for name in ("mask_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                fail(name, "a token id (an integer >= 0)", value)
        if not all(_is_int(i) and i >= 0 for i in _as_list(self.eos_token_id)):
            fail("eos_token_id", "a token id, a list of token ids, or None", self.eos_token_id)
        if self.block_length is not None:
            if not _is_int(self.block_length) or self.block_length < 1:
                fail("block_length", "an integer >= 1 (or None)", self.block_length)
        if self.max_new_tokens is not None and (self.block_length is not None or self.open_ended):
            block_length = decode_block_length(self)
            if self.max_new_tokens % block_length and not self.open_ended:
                fail("block_length", f"a divisor of max_new_tokens ({self.max_new_tokens})", self.block_length)
            n_blocks = -(-self.max_new_tokens // block_length)
            if self.steps < n_blocks:
                fail("steps", f">= the number of blocks ({n_blocks} blocks of block_length {block_length} in "
                     f"max_new_tokens {self.max_new_tokens})", self.steps)
        if self.parallel_factor is not None:
            if not (_is_real(self.parallel_factor) and self.parallel_factor > 0):
                fail("parallel_factor", "a number > 0 (or None)", self.parallel_factor)
            if self.alg_p_threshold:
                fail("parallel_factor", "None when `alg_p_threshold` is set (both choose how many confident masks to "
                     "commit: set one)", self.parallel_factor)
        if self.commit_when_stable is not None and (not _is_int(self.commit_when_stable) or self.commit_when_stable < 1):
            fail("commit_when_stable", "an integer >= 1 (or None)", self.commit_when_stable)
        strategies = [name for name in ("parallel_factor", "credit_decoding") if getattr(self, name)]
        if strategies and self.decoding_pipeline != "dim":
            fail(strategies[0], "left unset with decoding_pipeline='dream' (it is a rule of the `dim` pipeline)",
                 getattr(self, strategies[0]))
        if self.credit_decoding and self.alg != "maskgit_plus":
            fail("credit_decoding", "False unless alg='maskgit_plus' (credit raises a probability; other algorithms' "
                 "confidences are margins or entropies)", self.credit_decoding)
        if self.dual_cache and self.block_length is None:
            fail("dual_cache", "False unless `block_length` is set (the cache is refreshed at block boundaries)",
                 self.dual_cache)

    def validate_for_model(self, vocab_size: int) -> None:
        """`validate`, plus what a decode needs once the model's defaults are in: the mask token and every id
        that is written into the answer inside the vocabulary."""
        if self.temperature is None:
            self.temperature = 0.0
        self.validate()
        if self.mask_token_id is None:
            raise ValueError("`mask_token_id` must be a token id (in the generation config or the model config), got None")
        if self.pad_token_id is None:
            raise ValueError("`pad_token_id` must be a token id (by default the model's padding or end-of-text token)")
        for name in ("mask_token_id", "pad_token_id", "eos_token_id"):
            if any(i >= vocab_size for i in _as_list(getattr(self, name))):
                raise ValueError(
                    f"`{name}` must be a token id < the vocabulary size {vocab_size}, got {getattr(self, name)!r}"
                )

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
        past_key_values (`DimpleConversationCache`): the conversation so far (this turn's prompt and answer after
            the earlier turns'), to pass with the next turn's tokens as `past_key_values`.
        history (`tuple[torch.LongTensor]`, *optional*): the sequences after every step (`output_history`).
        num_forward_passes (`int`): model forward passes taken.
        tokens_per_forward (`torch.FloatTensor` of shape `(batch * num_return_sequences,)`): per row, its answer
            tokens (up to its end-of-text, which is not counted) over the passes in which it had masks to decode,
            as transformers' diffusion generation outputs report it.
        scores (`tuple[torch.FloatTensor]`, *optional*): with `output_scores=True`, per forward pass the logits of
            the positions it scored, `(batch, block, vocab)` (`[:, j]` predicts block position j; the whole canvas
            without blocks) after `logits_processor` and `generation_logits_hook_func`, before the temperature and
            top-p / top-k filters. Positions already committed are in it too: only masked ones are scored.
        logits (`tuple[torch.FloatTensor]`, *optional*): with `output_logits=True`, the same of the head's
            unprocessed logits.
    """

    sequences: torch.LongTensor = None
    history: Optional[tuple] = None
    num_forward_passes: Optional[int] = None
    tokens_per_forward: Optional[torch.Tensor] = None
    scores: Optional[tuple] = None
    logits: Optional[tuple] = None
    past_key_values: Optional["DimpleConversationCache"] = None


# --------------------------------------------------------------------------------------------------
# Scoring: token and confidence of every masked position
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


def probability_confidence(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The chosen token's probability (`origin`, `origin-ratio`, `autoregressive`, `maskgit_plus`)."""
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def margin_confidence(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability (`topk_margin`)."""
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def negative_entropy_confidence(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Σ p·log p, the negative entropy (`entropy`): highest for a peaked distribution."""
    return (probs * torch.log(probs + 1e-10)).sum(dim=-1)


CONFIDENCE_FUNCTIONS = {"topk_margin": margin_confidence, "entropy": negative_entropy_confidence}


class PositionScorer:
    """Token and confidence for every row of `logits` (decoding passes those of the masked positions): the
    token is sampled (temperature > 0) or the argmax of the filtered distribution; the confidence depends on
    `alg` and is computed from the unmodified distribution when `original_confidence`. Computed in fp32."""

    def __init__(self, config, original_confidence: bool):
        self.mask_token_id = config.mask_token_id
        self.temperature, self.top_p, self.top_k = config.temperature, config.top_p, config.top_k
        self.original_confidence = original_confidence
        self.confidence = CONFIDENCE_FUNCTIONS.get(config.alg, probability_confidence)

    def __call__(self, logits: torch.Tensor, generator=None) -> tuple:
        raw = logits.float()
        # `<|mask|>` is never a generated token: a committed mask would be re-opened at the next step (and `dim`
        # could end with masks in the answer). A trained model gives it ~0 probability, so this changes nothing.
        candidates = raw.clone()
        candidates[..., self.mask_token_id] = float("-inf")  # a scalar fill: no host-device copy
        filtered = filter_logits(candidates, self.temperature, self.top_p, self.top_k)
        if self.temperature > 0:
            probs = filtered.softmax(dim=-1)
            # torch.multinomial's draw of one sample, argmax(p / q) with q ~ Exp(1) (the same numbers for the same
            # generator), without the two validity checks it reads back to the host: no sync inside the step.
            tokens = (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(dim=-1)
        else:
            probs, tokens = None, filtered.argmax(dim=-1)  # greedy needs no softmax of the filtered logits
        if self.original_confidence or probs is None:
            probs = (raw if self.original_confidence else filtered).softmax(dim=-1)
        return tokens, self.confidence(probs, tokens)


def score_positions(logits: torch.Tensor, config, original_confidence: bool, generator=None) -> tuple:
    """`PositionScorer(config, original_confidence)(logits, generator)`: (tokens, confidences)."""
    return PositionScorer(config, original_confidence)(logits, generator)


def scatter_scores(tokens, confidence, masked, block_tokens) -> tuple:
    """The tokens and confidences scored at the flat positions `masked` of a `(batch, block)` canvas, placed
    into `(batch, block)` tensors on the canvas's device: the block's own tokens and -inf confidence elsewhere
    (never committed). (The head's device may differ from the canvas's when the model is split over devices.)"""
    device = block_tokens.device
    all_tokens = block_tokens.flatten().index_copy(0, masked, tokens.to(device)).view_as(block_tokens)
    all_confidence = torch.full(block_tokens.shape, float("-inf"), device=device, dtype=confidence.dtype)
    all_confidence.view(-1).index_copy_(0, masked, confidence.to(device))
    return all_tokens, all_confidence


# --------------------------------------------------------------------------------------------------
# Which positions: priorities by `alg`, resolved once per decode
# --------------------------------------------------------------------------------------------------


def top_k_per_row(priority: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the k[row] highest-priority candidates of every row (k may differ per row)."""
    priority = priority.masked_fill(~candidates, float("-inf"))
    order = priority.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return candidates & (rank < k.unsqueeze(-1))


def random_priority(is_mask, confidence, generator):
    return torch.rand(is_mask.shape, device=is_mask.device, generator=generator)


def leftmost_priority(is_mask, confidence, generator):
    return -torch.arange(is_mask.shape[-1], device=is_mask.device, dtype=torch.float32).expand(is_mask.shape)


def confidence_priority(is_mask, confidence, generator):
    return confidence


def sampled_confidence_priority(alg_temp: float) -> Callable:
    """Positions drawn without replacement from softmax(confidence / alg_temp), by the Gumbel top-k trick."""

    def priority(is_mask, confidence, generator):
        uniform = torch.rand(is_mask.shape, device=is_mask.device, generator=generator)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
        return (confidence / alg_temp).masked_fill(~is_mask, float("-inf")).log_softmax(dim=-1) + gumbel

    return priority


class PositionChooser:
    """Which masked positions a row commits at a step, given its count (per row).

    `origin` takes `count` positions uniformly at random; confidence algorithms the most confident (or, with
    `alg_temp` > 0, `count` drawn without replacement from softmax(confidence / alg_temp)); `autoregressive`
    exactly one position, the leftmost mask, whatever `count` is (the original decoder's rule, on the last step
    too: with fewer steps than masks and no confidence threshold the answer keeps masks, which
    `decode_answers` drops). `origin-ratio` instead commits each masked position independently with
    probability `ratio` (per row).
    """

    def __init__(self, alg: str, alg_temp: Optional[float] = None):
        self.independent = alg == "origin-ratio"
        self.one_per_step = alg == "autoregressive"
        if alg in ("origin", "origin-ratio"):
            self.priority = random_priority
        elif self.one_per_step:
            self.priority = leftmost_priority
        elif alg_temp:
            self.priority = sampled_confidence_priority(alg_temp)
        else:
            self.priority = confidence_priority

    def __call__(self, is_mask, count, ratio, confidence, generator=None) -> torch.Tensor:
        if self.independent:
            draw = torch.rand(is_mask.shape, device=is_mask.device, generator=generator)
            return is_mask & (draw < ratio.unsqueeze(-1))
        if self.one_per_step:
            count = torch.ones_like(count)
        return top_k_per_row(self.priority(is_mask, confidence, generator).float(), is_mask, count)


def choose_positions(alg, is_mask, count, ratio, confidence, alg_temp, generator=None) -> torch.Tensor:
    """`PositionChooser(alg, alg_temp)(is_mask, count, ratio, confidence, generator)`."""
    return PositionChooser(alg, alg_temp)(is_mask, count, ratio, confidence, generator)


# --------------------------------------------------------------------------------------------------
# How many positions: the schedules
# --------------------------------------------------------------------------------------------------


def schedule_points(eps: float, steps: int, device=None) -> torch.Tensor:
    """τ = linspace(1, eps, steps + 1) in float64 (the fraction of masks left after each step)."""
    return torch.linspace(1, eps, steps + 1, dtype=torch.float64, device=device)


def decode_block_length(config) -> Optional[int]:
    """The block length a decode runs with: `block_length`, else `OPEN_ENDED_BLOCK_LENGTH` for open-ended decoding
    (whose lookahead, the masks kept in view past the block, is one block too), else None (one block)."""
    return config.block_length or (OPEN_ENDED_BLOCK_LENGTH if config.open_ended else None)


def plan_blocks(canvas_len: int, block_length: Optional[int], steps: int) -> list:
    """(start, end, steps) of each block, decoded left to right; `steps` is shared out evenly (the first
    blocks take the remainder). Without `block_length` the whole canvas is one block; a `block_length` that does
    not divide the canvas (open-ended decoding) leaves a shorter last block."""
    block_length = min(block_length or canvas_len, canvas_len)
    n_blocks = -(-canvas_len // block_length)
    return [
        (i * block_length, min(canvas_len, (i + 1) * block_length), steps // n_blocks + (i < steps % n_blocks))
        for i in range(n_blocks)
    ]


# --------------------------------------------------------------------------------------------------
# Parallel decoding strategies: how many masks a pass commits beyond the schedule (the `dim` pipeline)
# --------------------------------------------------------------------------------------------------


class ThresholdRule:
    """Confident decoding (`alg_p_threshold`): every mask whose confidence exceeds the threshold."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, is_mask: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        return is_mask & (confidence > self.threshold)


class FactorRule:
    """Fast-dLLM's factor-based parallel decoding (`parallel_factor`): per row, the n most confident masks, n the
    largest count whose k-th highest confidence is at least 1 - factor / (k + 1) for every k <= n; at least the
    most confident one (Fast-dLLM's reference commits one more when every mask passes its bound or none does;
    here exactly the passing prefix, at least one)."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, is_mask: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        ranked, order = confidence.masked_fill(~is_mask, float("-inf")).sort(dim=-1, descending=True)
        k = torch.arange(1, ranked.shape[-1] + 1, device=ranked.device, dtype=ranked.dtype)
        passing = ranked >= 1 - self.factor / (k + 1)
        passing[:, 0] = True
        count = passing.long().cumprod(dim=-1).sum(-1, keepdim=True)
        rank = order.argsort(dim=-1)  # each position's place in its row's ranking
        return is_mask & (rank < count)


def parallel_rule(config) -> Optional[Callable]:
    """The rule choosing a pass's confident masks, or None (the schedule alone)."""
    if config.parallel_factor:
        return FactorRule(config.parallel_factor)
    if config.alg_p_threshold:
        return ThresholdRule(config.alg_p_threshold)
    return None


class CreditTrace:
    """CreditDecoding's trace credit (`credit_decoding`), one credited token per position: while a masked
    position's top token stays the same, its credit grows c <- gamma * c + p^alpha (and starts again at p^alpha
    when the top token changes); its confidence is then max(p, p') with p' the token's probability after raising
    its logit by lambda * log(1 + c): p' = p b / (1 - p + p b), b = (1 + c)^lambda. State per decode, per row and
    canvas position. The reference keeps several credited tokens per position; one suffices for the top token."""

    GAMMA, LAMBDA, ALPHA = 0.65, 0.7, 0.5

    def __init__(self, rows: int, canvas_len: int, device):
        self.token = torch.full((rows, canvas_len), -1, dtype=torch.long, device=device)
        self.credit = torch.zeros(rows, canvas_len, dtype=torch.float32, device=device)

    def __call__(self, tokens, confidence, is_mask, lo: int, hi: int) -> torch.Tensor:
        p = confidence.float().clamp(0, 1).masked_fill(~is_mask, 0)
        same = tokens == self.token[:, lo:hi]
        credit = torch.where(same, self.GAMMA * self.credit[:, lo:hi], 0.0) + p.clamp_min(1e-6) ** self.ALPHA
        self.credit[:, lo:hi] = torch.where(is_mask, credit, self.credit[:, lo:hi])
        self.token[:, lo:hi] = torch.where(is_mask, tokens, self.token[:, lo:hi])
        boost = (1 + credit) ** self.LAMBDA
        fused = p * boost / (1 - p + p * boost).clamp_min(1e-12)
        return torch.where(is_mask, torch.maximum(p, fused).to(confidence.dtype), confidence)


class StableCommit:
    """Early commit once the draft has settled (`commit_when_stable=k`): a row whose predicted tokens at its
    masks are the same as at the previous pass, `k` passes in a row, commits all its masks of the block."""

    def __init__(self, passes: int, rows: int, canvas_len: int, device):
        self.passes = passes
        self.previous = torch.full((rows, canvas_len), -1, dtype=torch.long, device=device)
        self.stable = torch.zeros(rows, dtype=torch.long, device=device)

    def __call__(self, chosen, tokens, is_mask, lo: int, hi: int, first_pass_of_block: bool) -> torch.Tensor:
        unchanged = ((tokens == self.previous[:, lo:hi]) | ~is_mask).all(-1) & is_mask.any(-1)
        self.stable = torch.where(unchanged & (not first_pass_of_block), self.stable + 1, 0)
        self.previous[:, lo:hi] = tokens
        return chosen | (is_mask & (self.stable >= self.passes)[:, None])


class DimPipeline:
    """Dimple's decoding: confident decoding, then a ratio schedule over the masks left."""

    original_confidence_allowed = True

    def commits_nothing(self, step: int, is_mask: torch.Tensor) -> bool:
        return False  # the schedule takes the first point that commits at least one position (`schedule`)

    def __init__(self, config, steps: int, device=None, chooser: Optional[PositionChooser] = None):
        self.config, self.steps = config, steps
        self.taus = schedule_points(config.eps, steps, device)
        self.chooser = chooser or self.make_chooser(config)
        self.rule = parallel_rule(config)

    @staticmethod
    def make_chooser(config) -> PositionChooser:
        return PositionChooser(config.alg, config.alg_temp)

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
        last_step = step == self.steps - 1
        count, ratio = self.schedule(step, is_mask.sum(-1), masks_start)
        chosen = self.chooser(is_mask, count, ratio, confidence, generator)
        if self.rule is not None:
            confident = self.rule(is_mask, confidence) if not last_step else is_mask
            chosen = torch.where(confident.any(-1, keepdim=True), confident, chosen)
        return chosen


class DreamPipeline:
    """Dream's decoding: step i moves from t = τ_i to s = τ_{i+1}."""

    original_confidence_allowed = False

    def __init__(self, config, steps: int, device=None, chooser: Optional[PositionChooser] = None):
        self.config, self.steps = config, steps
        self.taus = schedule_points(config.eps, steps).tolist()  # Python floats: no device sync per step
        self.chooser = chooser or self.make_chooser(config)

    @staticmethod
    def make_chooser(config) -> PositionChooser:
        # Dream's `origin` commits each masked position independently with probability 1 − s/t
        alg = "origin-ratio" if config.alg in ("origin", "origin-ratio") else config.alg
        return PositionChooser(alg, config.alg_temp)

    def commits_nothing(self, step: int, is_mask: torch.Tensor) -> bool:
        """Whether the step's schedule commits no position in any row, whatever the logits: floor(masks × (1 −
        s/t)) is 0 in every row of a deterministic decode (the count-based confidence choosers; not `origin`,
        `autoregressive`, nor the last step, which takes every mask). The loop then skips its forward pass, as the Dim pipeline's schedule skips such
        points: the tokens are those of running it. Sampled decodes run it (their random draws stay in step)."""
        config = self.config
        if step == self.steps - 1 or self.chooser.independent or self.chooser.one_per_step or config.temperature \
                or config.alg_temp or self.chooser.priority is random_priority:
            return False
        ratio = 1 - self.taus[step + 1] / self.taus[step]
        return not bool((torch.floor(is_mask.sum(-1).double() * ratio) >= 1).any())

    def commit(self, step, is_mask, masks_start, confidence, generator):
        t, s = self.taus[step], self.taus[step + 1]
        last_step = step == self.steps - 1
        ratio = 1.0 if last_step else 1 - s / t
        masks_left = is_mask.sum(-1)
        count = masks_left if last_step else torch.floor(masks_left.double() * ratio).long()
        ratio = torch.full(is_mask.shape[:1], ratio, device=is_mask.device)
        return self.chooser(is_mask, count, ratio, confidence, generator)


PIPELINE_CLASSES = {"dim": DimPipeline, "dream": DreamPipeline}


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

    Open-ended decoding (`lookahead` not None) attends only over what exists of the growing canvas: the prompt,
    the settled blocks, the block and `lookahead` masks after it (`open_pass`).

    A later turn of a conversation (`past`: the earlier turns' keys/values, `past.length` positions) runs only
    its own positions: every query position here is one of the whole conversation, from `past.length` on, and
    `position_ids` and `attn_mask` span the whole conversation.
    """

    def __init__(self, model, prompt_embeds, position_ids, attn_mask, canvas_len, block_length,
                 use_cache, dual_cache, use_cuda_graph, use_torch_compile=False, lookahead=None, past=None):
        batch, new_len, hidden = prompt_embeds.shape
        device = prompt_embeds.device
        self.offset = 0 if past is None else past.length  # positions already in the cache (earlier turns)
        prompt_len = self.offset + new_len
        total, block = prompt_len + canvas_len, block_length or canvas_len
        self.model, self.prompt_len, self.block = model, prompt_len, block
        self.embeds = prompt_embeds.new_empty(batch, total - self.offset, hidden)  # from the offset on
        self.embeds[:, :new_len] = prompt_embeds
        self.canvas = torch.empty(batch, canvas_len, dtype=torch.long, device=device)
        self.position_ids, self.attn_mask = position_ids, attn_mask
        self.open_ended, self.lookahead, self.canvas_len = lookahead is not None, lookahead, canvas_len
        use_cuda_graph = use_cuda_graph and not self.open_ended  # its passes change shape block by block
        self.stale_from = 0  # open-ended: the canvas position from which the cached keys/values are not final
        if past is not None:
            self.cache = past.extended(total)
        else:
            self.cache = model.new_prefix_cache(total) if use_cache or dual_cache else None
        self.cache_filled = False
        self.freeze_prompt, self.dual_cache = use_cache, dual_cache
        first = prompt_len - 1  # the last prompt token's query predicts the first canvas position
        self.queries = {
            "full": torch.arange(self.offset, total, device=device),
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
        self.cached_forward = compiled_decoder(model) if use_torch_compile else model.decoder_forward

    def __call__(self, canvas: torch.Tensor, lo: int, hi: int, first_step_of_block: bool) -> torch.Tensor:
        if self.open_ended:
            return self.open_pass(canvas, lo, hi, first_step_of_block)
        self.canvas.copy_(canvas)
        if lo != self.block_start:
            self.block_start = lo
            self.queries["window"].copy_(torch.arange(self.prompt_len - 1 + lo, self.prompt_len + hi, device=self.canvas.device))
            if torch.is_tensor(self.keep["tail"]):
                self.keep["tail"].copy_(torch.arange(lo, hi, device=self.canvas.device))
        if self.cache is None or not self.cache_filled or (
            self.dual_cache and first_step_of_block and not self.freeze_prompt
        ):
            self.cache_filled = self.cache is not None
            first = self.prompt_len - 1 - self.offset
            return self._pass("full", slice(first + lo, first + hi))
        kind = "window" if self.dual_cache and not first_step_of_block else "tail"
        return self._replay(kind)

    def open_pass(self, canvas: torch.Tensor, lo: int, hi: int, first_step_of_block: bool) -> torch.Tensor:
        """A pass of open-ended decoding: keys over the prompt and the canvas up to `lookahead` masks past the
        block; queries from the block's predecessor (whose query predicts the block's first position) to the end
        of what is in view. With a cache, a block's first pass also reruns the block before it, settled since its
        last pass (its keys/values become final), and the prompt stays that of the first pass (`use_cache`); the
        dual cache's later passes stop at the block's end, reading the lookahead from the cache."""
        prompt_len, device = self.prompt_len, canvas.device
        visible = prompt_len + min(self.canvas_len, hi + self.lookahead)
        first = prompt_len - 1 + lo
        if self.cache is None or not self.cache_filled:
            start = self.offset
        elif first_step_of_block:
            start = prompt_len + self.stale_from if self.freeze_prompt else self.offset
        else:
            start = first
        end = prompt_len + hi if self.dual_cache and start == first else visible
        self.cache_filled, self.stale_from = self.cache is not None, lo
        embed_from, offset = max(start, prompt_len), self.offset
        self.embeds[:, embed_from - offset : end - offset] = self.model.get_input_embeddings()(
            canvas[:, embed_from - prompt_len : end - prompt_len]
        )
        if self.cache is not None:
            self.cache.set_length(visible)
        inputs = dict(
            inputs_embeds=self.embeds[:, start - offset : end - offset],
            attention_mask=None if self.attn_mask is None else self.attn_mask[:, :, start:end, :visible],
            position_ids=self.position_ids[:, :, start:end],
            past_key_values=self.cache,
            cache_position=None if self.cache is None else torch.arange(start, end, device=device),
        )
        forward = self.model.decoder_forward if start == offset else self.cached_forward
        return forward(**inputs)[0][:, first - start : first - start + hi - lo]

    def _pass(self, kind: str, keep) -> torch.Tensor:
        """Embed the current canvas and run the query positions of `kind`; the outputs that predict the block."""
        queries = self.queries[kind]
        self.embeds[:, self.prompt_len - self.offset :] = self.model.get_input_embeddings()(self.canvas)
        inputs = dict(
            inputs_embeds=self.embeds.index_select(1, queries - self.offset if self.offset else queries),
            attention_mask=None if self.attn_mask is None else self.attn_mask.index_select(2, queries),
            position_ids=self.position_ids.index_select(2, queries),
            past_key_values=self.cache,
            cache_position=None if self.cache is None else queries,
        )
        forward = self.model.decoder_forward if kind == "full" else self.cached_forward
        return forward(**inputs)[0][:, keep]

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


# (class, "layer" or "whole") -> torch.compile of the layer's forward or of decoder_forward (holding no model)
_COMPILED_DECODERS = {}


def compiled_decoder(model, regional: bool = True) -> Callable:
    """`model.decoder_forward` through `torch.compile`, built once per class and reused by every decode (the
    model is an argument, so a copy of the model runs its own weights). Regional (the default): one compile of
    the decoder layer's forward runs every layer (same code, the weights are its inputs: one graph), the rest of
    the pass (rotary tables, mask, final norm) runs eager, and a cold compile traces one layer instead of the
    whole pass (docs/performance.md). `regional=False` compiles the whole `decoder_forward`."""
    if not regional:
        key = (type(model), "whole")
        if key not in _COMPILED_DECODERS:
            _COMPILED_DECODERS[key] = torch.compile(type(model).decoder_forward)
        return functools.partial(_whole_pass, _COMPILED_DECODERS[key], model)
    key = (type(model.model.layers[0]), "layer")
    if key not in _COMPILED_DECODERS:
        _COMPILED_DECODERS[key] = torch.compile(key[0].forward)
    return functools.partial(model.decoder_forward, layer_forward=functools.partial(_regional_layer, _COMPILED_DECODERS[key]))


def mark_dynamic(dynamic: list) -> None:
    """`torch._dynamo.maybe_mark_dynamic` for each (tensor or None, dims): sizes that change between requests (the
    batch, the cached length) compile once as dynamic sizes instead of once per shape, which would reach
    torch.compile's recompile limit after a few prompts and then run eager."""
    for tensor, dims in dynamic:
        for dim in dims if tensor is not None else ():
            torch._dynamo.maybe_mark_dynamic(tensor, dim)


def _whole_pass(compiled, model, **inputs):
    """Run the whole-pass compile of `decoder_forward`; the pass's own length is fixed by the settings."""
    mark_dynamic([(inputs["inputs_embeds"], (0,)), (inputs["attention_mask"], (0, 3)), (inputs["position_ids"], (1,))]
                 + [(kv, (0, 1)) for kv in inputs["past_key_values"].key_values])  # (batch, keys, 2 * kv_heads, dim)
    return compiled(model, **inputs)


class _LayerCache:
    """One layer's tensor of a filled prefix cache, with the cache's `update`: the compiled layer then reads no
    layer index (an int attribute is a constant to torch.compile, which would compile once per layer)."""

    def __init__(self, key_values: torch.Tensor):
        self.key_values = key_values

    def update(self, layer_idx: int, key_value: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.key_values.index_copy_(1, positions, key_value)


def _regional_layer(compiled, layer, hidden, rotary, attn_mask, is_causal, cache, positions, output_attentions):
    """Run `layer` through the shared compiled layer forward; batch, pass length and cached length are declared
    dynamic (they change between requests), so one graph serves every layer, pass kind and prompt."""
    if cache is not None:
        if len(cache.key_values) <= layer.self_attn.layer_idx:  # the first write allocates the layer's cache
            return layer(hidden, rotary, attn_mask, is_causal, cache, positions, output_attentions)
        cache = _LayerCache(cache.key_values[layer.self_attn.layer_idx])
    mark_dynamic([(hidden, (0, 1)), (positions, (0,)), *((table, (0, 1)) for table in rotary),
                  (attn_mask, (0, 2, 3)), (cache and cache.key_values, (0, 1))])
    return compiled(layer, hidden, rotary, attn_mask, is_causal, cache, positions, output_attentions)


class SettledTokenStream:
    """Feeds a streamer the answer as it settles, in transformers' streaming protocol (each token once, in
    order): `put` first receives the prompt, then after every step the newly settled tokens, that is the
    committed tokens left of the first mask, up to the first end-of-text; `end()` at the end.

    transformers' text streamers (`TextStreamer`, `TextIteratorStreamer`, ...; batch 1) receive 1-D tensors, as
    from `generate`. Any other streamer that sets `settled_tokens = True` receives the prompt ids `(batch,
    prompt)`, then one 1-D tensor per row (a list, possibly empty tensors) after every step."""

    def __init__(self, streamer, prompt: torch.Tensor, mask_id: int, end_ids: torch.Tensor):
        self.streamer, self.mask_id, self.end_ids = streamer, mask_id, end_ids
        self.per_row = not isinstance(streamer, TextStreamer)
        self.sent = [0] * prompt.shape[0]
        streamer.put(prompt.cpu() if self.per_row else prompt[0].cpu())

    def put(self, canvas: torch.Tensor) -> None:
        # the first mask or end-of-text of every row (a sentinel past the end when there is none): one host sync
        unsettled = F.pad((canvas == self.mask_id) | torch.isin(canvas, self.end_ids), (0, 1), value=True)
        settled = unsettled.int().argmax(dim=-1).tolist()
        new = [row[sent:end].cpu() for row, sent, end in zip(canvas, self.sent, settled)]
        self.sent = [max(sent, end) for sent, end in zip(self.sent, settled)]
        if self.per_row:
            self.streamer.put(new)
        elif new[0].numel():
            self.streamer.put(new[0])

    def put_draft(self, draft: torch.Tensor) -> None:
        """The draft after the settled tokens: from each row's first unsettled position up to its first
        end-of-text or undecoded mask of `draft` (the canvas with this pass's predictions at its masks), as
        `put_draft(value, canvas=draft)`, `value` a 1-D tensor (text streamers) or one per row."""
        stop = F.pad((draft == self.mask_id) | torch.isin(draft, self.end_ids), (0, 1), value=True)
        ends = stop.int().argmax(dim=-1).tolist()
        tails = [row[sent:max(sent, end)].cpu() for row, sent, end in zip(draft, self.sent, ends)]
        self.streamer.put_draft(tails if self.per_row else tails[0], canvas=draft.cpu())

    def end(self) -> None:
        self.streamer.end()


class ProgressDisplay:
    """`show_progress=True`: one status line on stderr, rewritten after every pass (passes done, masks left)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def update(self, passes: int, masks_left: int) -> None:
        self.stream.write(f"\rdiffusion decoding: {passes} forward passes, {masks_left} masks left ")
        self.stream.flush()

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def streams_settled_tokens(streamer) -> bool:
    """Whether a streamer takes the settled answer tokens (transformers' text streamers, or `settled_tokens =
    True`) rather than the whole canvas `(batch, max_new_tokens)` after every step."""
    return isinstance(streamer, TextStreamer) or getattr(streamer, "settled_tokens", False) is True


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


def non_finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """Device flag: a NaN or +inf logit, or a position whose every logit is -inf (no token is possible)."""
    return ~((logits < float("inf")).all(dim=-1) & (logits > float("-inf")).any(dim=-1)).all()


def masked_positions(is_mask: torch.Tensor, problem: torch.Tensor) -> tuple:
    """(flat indices of the masked positions, whether `problem` was set): the step's one host sync. The device
    flag `problem` (the previous step's checks) rides along: repeated past the canvas size, a set flag makes
    the count of nonzero entries exceed any possible count of masks."""
    flat = is_mask.flatten()
    found = torch.cat([flat, problem.expand(flat.numel() + 1)]).nonzero().squeeze(-1)
    if found.numel() > flat.numel():
        return found, True
    return found, False


def stopped_rows(criteria: list, sequences: torch.Tensor) -> Optional[torch.Tensor]:
    """Rows that `stopping_criteria` (transformers' `StoppingCriteria` protocol: `(sequences, scores) -> bool
    tensor (batch,)` or a bool) mark done, as a device tensor; None without criteria."""
    done = None
    for criterion in criteria:
        result = criterion(sequences, None)
        result = torch.as_tensor(result, device=sequences.device).bool().expand(sequences.shape[0])
        done = result if done is None else done | result
    return done


class DimpleConversationCache:
    """The conversation so far, for the next turn: `diffusion_generate(new_turn_ids, past_key_values=cache)` runs
    only the new turn's tokens (and encodes only its images), attending over the earlier turns' keys and values.
    Returned as `past_key_values` by `diffusion_generate(..., return_dict_in_generate=True)`.

    Its keys/values are those of one bidirectional pass over this turn's prompt and answer (after the earlier
    turns' cached ones), as a fresh prefill of the conversation would compute them; that pass runs when the cache
    is first used (`key_values`), so a decode that is not continued costs no pass. Until then it holds this turn's
    input embeddings (images encoded), their rotary positions and the padding of the conversation.

    Args:
        past (`DimpleConversationCache`, *optional*): the earlier turns.
        prompt_embeds (`(batch, prompt, hidden)`): this turn's prompt embeddings (images encoded); the answer's
            are looked up from `token_ids` when the keys/values are computed.
        position_ids (`(3, batch, n)`): their M-RoPE positions.
        attention_mask (`(batch, past + n)`): 1 for a token, 0 for padding (left padding, and the positions after a
            row's end-of-text when its answer is shorter than another row's).
        token_ids (`(batch, n)`): this turn's tokens (prompt and answer).
    """

    def __init__(self, past, prompt_embeds, position_ids, attention_mask, token_ids):
        self.past, self.prompt_embeds, self.position_ids = past, prompt_embeds, position_ids
        self.attention_mask, self.token_ids = attention_mask, token_ids
        self.length = attention_mask.shape[1]
        self.batch_size = attention_mask.shape[0]
        # The next token's rotary position: one past the largest position of a token (padding aside).
        real = attention_mask[:, -position_ids.shape[2] :].bool()
        last = position_ids.masked_fill(~real[None], -1).amax(dim=(0, 2))
        self.next_position = last + 1
        self._key_values = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def key_values(self, model):
        """The `DimplePrefixCache` of the conversation: the earlier turns' keys/values and, computed at the first
        call, this turn's."""
        if self._key_values is None:
            past = None if self.past is None else self.past.key_values(model)
            start = 0 if past is None else past.length
            cache = model.new_prefix_cache(self.length) if past is None else past.extended(self.length)
            padding = None if bool(self.attention_mask.all()) else self.attention_mask
            answer = self.token_ids[:, self.prompt_embeds.shape[1] :]
            device = self.prompt_embeds.device
            with torch.no_grad():
                embeds = torch.cat([self.prompt_embeds, model.get_input_embeddings()(answer.to(device))], 1)
                model.decoder_forward(
                    inputs_embeds=embeds, attention_mask=padding, position_ids=self.position_ids,
                    past_key_values=cache, cache_position=torch.arange(start, self.length, device=device),
                )
            # what the keys/values were computed from is not needed any more
            self._key_values, self.prompt_embeds, self.past = cache, None, None
        return self._key_values


@dataclass
class DecodeRequest:
    """A validated call of `diffusion_generate`: the settings and the inputs."""

    config: DimpleGenerationConfig
    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]
    prior: Optional[torch.Tensor]
    tokens_hook: Optional[Callable]
    logits_hook: Optional[Callable]
    streamer: Optional[object]
    generator: Optional[torch.Generator]
    stopping_criteria: list
    logits_processor: Optional[Callable] = None
    show_progress: bool = False
    past: Optional[DimpleConversationCache] = None


@dataclass
class PreparedDecode:
    """What the loop runs on: the sequences, the model call, and `alg` resolved into scorer and chooser."""

    x: torch.Tensor
    prompt_len: int
    denoise: "DenoisingForward"
    scorer: PositionScorer
    pipeline_class: type
    chooser: PositionChooser
    end_ids: torch.Tensor
    streamer: Optional[object]
    # The conversation's padding mask up to the answer, (batch, past + prompt), 1 = token: for the returned cache.
    conversation_mask: Optional[torch.Tensor] = None
    past: Optional[DimpleConversationCache] = None
    credit: Optional[CreditTrace] = None
    stable: Optional[StableCommit] = None


def commit_pass(prepared, pipeline, step, first_pass_of_block, masked_logits, masked, is_mask, masks_start,
                block_tokens, lo, hi, generator=None) -> tuple:
    """What one pass commits in a block: the masked positions' logits scored (`prepared.scorer`), credit and
    stability traces applied, the pipeline's choice. Returns the block's tokens after the pass and the predicted
    tokens at every position (the draft). The one commit rule of `diffusion_generate` and of `RunningDecodeBatch`."""
    tokens, confidence = scatter_scores(*prepared.scorer(masked_logits, generator), masked, block_tokens)
    if prepared.credit is not None:
        confidence = prepared.credit(tokens, confidence, is_mask, lo, hi)
    chosen = pipeline.commit(step, is_mask, masks_start, confidence, generator)
    if prepared.stable is not None:
        chosen = prepared.stable(chosen, tokens, is_mask, lo, hi, first_pass_of_block=first_pass_of_block)
    return torch.where(chosen, tokens, block_tokens), tokens


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
        if kwargs.get("temperature", 0) is None:  # generic callers' "unset": the checkpoint's temperature
            del kwargs["temperature"]
            temperature_given = False
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
            stop_at_eos, open_ended, use_cuda_graph, use_torch_compile, output_history, output_scores,
            output_logits, return_dict_in_generate,
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
            stopping_criteria (`StoppingCriteria`, a callable or a list of them, *optional*): called after every
                step as `criterion(sequences, None)`, returning a bool tensor `(batch,)` (or a bool for all rows);
                a row marked done stops decoding there (its masks stay), and decoding ends once every row is done
                (e.g. a client that cancelled, or a deadline).
            streamer (`BaseStreamer`, *optional*): `put` receives the answer canvases `(batch, max_new_tokens)`
                after every step, `end` is called at the end (also on an error). transformers' text streamers
                (batch 1) and any streamer with `settled_tokens = True` receive the prompt, then the answer's
                tokens as they settle (those left of the first mask, up to the end-of-text), each once
                (`SettledTokenStream`). A streamer with `put_draft` (transformers' `TextDiffusionStreamer`) also
                receives the draft after every pass: the canvas with that pass's predictions at the masks it
                left, as `put_draft(value, canvas=...)`, `value` the part after the settled tokens (up to the first
                end-of-text or undecoded mask) for settled-token streamers, the whole canvas otherwise.
            logits_processor (`LogitsProcessorList`, *optional*): transformers' logits processors, applied at every
                pass to the block's logits as `logits_processor(sequences, logits)` with logits `(batch, block,
                vocab)`, before `generation_logits_hook_func` (processors that work on the last dimension, such as
                temperature, top-k, top-p or `SuppressTokensLogitsProcessor`, apply as they are).
            show_progress (`bool`, *optional*, defaults to `False`): a status line on stderr after every pass
                (passes done, masks left), for long decodes.
            past_key_values (`DimpleConversationCache`, *optional*): the `past_key_values` of the previous turn's
                output: `inputs` (and `pixel_values`) are then only the new turn's tokens (and images), which
                attend over the earlier turns' keys/values instead of re-encoding them.
            generator (`torch.Generator`, *optional*): random source for sampling. One generator serves the whole
                batch: with random position choices (`origin`) or sampling, a row's draws depend on its place in
                the batch (the answers of greedy decoding do not).

        Returns:
            `torch.LongTensor` `(batch * num_return_sequences, prompt + max_new_tokens)`, or a
            `DimpleGenerationOutput` with `return_dict_in_generate=True`.
        """
        request = self._validate_request(inputs, generation_config, kwargs)
        prepared = self._prepare_decode(request)
        return self._denoise(request, prepared)

    def running_batch(self, max_rows: Optional[int] = None) -> "RunningDecodeBatch":
        """A `RunningDecodeBatch` on this model: decodes that join and leave between denoising passes (step-level
        continuous batching, for servers), each giving the tokens it gets from `diffusion_generate` alone."""
        return RunningDecodeBatch(self, max_rows)

    # ---------------------------------------------------------------- 1. validate

    def _validate_request(self, inputs, generation_config, kwargs) -> DecodeRequest:
        """Every setting and input checked before any forward pass: a `ValueError` naming the argument."""
        if isinstance(inputs, dict) or hasattr(inputs, "data") and isinstance(getattr(inputs, "data"), dict):
            kwargs = {**dict(inputs), **kwargs}
            inputs = None
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("`inputs` (the prompt's input_ids) is required")
        arguments = {name: kwargs.pop(name, None) for name in (
            "attention_mask", "pixel_values", "image_grid_thw", "generation_tokens_hook_func",
            "generation_logits_hook_func", "streamer", "generator", "response_prior", "tokenizer", "stopping_criteria",
            "logits_processor", "show_progress", "past_key_values",
        )}
        stop_at_eos_given = kwargs.get("stop_at_eos")
        config = self._dimple_generation_config(generation_config, kwargs)
        if config.open_ended is True and stop_at_eos_given is False:
            raise ValueError(
                "`stop_at_eos=False` cannot hold with `open_ended=True`: open-ended decoding ends a row at its first "
                "end-of-text (leave `stop_at_eos` out, or decode a fixed canvas with `open_ended=False`)"
            )
        for name, neutral in NEUTRAL_ARGUMENTS.items():
            if name in kwargs and (kwargs[name] is None or kwargs[name] == neutral):
                del kwargs[name]
        if kwargs:
            raise ValueError(
                f"unknown arguments to diffusion_generate: {sorted(kwargs)}; its settings are {list(SETTINGS)} "
                "(autoregressive options such as num_beams > 1 or repetition_penalty do not apply to diffusion; "
                f"their neutral values {NEUTRAL_ARGUMENTS} are accepted)"
            )
        if not torch.is_tensor(input_ids) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"`inputs` must be a tensor of token ids (torch.long), got {type(input_ids).__name__}"
                             + (f" of {input_ids.dtype}" if torch.is_tensor(input_ids) else ""))
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"`inputs` must be (batch, prompt) token ids, batch and prompt >= 1, got shape {tuple(input_ids.shape)}")
        batch, prompt_len = input_ids.shape
        attention_mask = self._checked_attention_mask(arguments["attention_mask"], input_ids)
        if config.max_length is not None and not _is_int(config.max_length):
            raise ValueError(f"`max_length` must be an integer, got {config.max_length!r}")
        if config.max_new_tokens is None:
            if config.max_length is None:  # e.g. `max_new_tokens=None` passed to mean "as long as needed"
                raise ValueError(
                    "`max_new_tokens` must be an integer >= 1 (the answer canvas: Dimple denoises a canvas of that "
                    "many positions, the answer and its end-of-text padding; with `open_ended=True`, the longest "
                    "answer), got None and no `max_length`"
                )
            if config.max_length - prompt_len < 1:
                raise ValueError(
                    f"`max_new_tokens` must be >= 1: the prompt ({prompt_len} tokens) is already at "
                    f"`max_length` ({config.max_length}); set `max_new_tokens` or a larger `max_length`"
                )
            config.max_new_tokens = config.max_length - prompt_len
        vocab_size = self.get_input_embeddings().num_embeddings
        config.validate_for_model(vocab_size)
        longest = getattr(self.config, "max_position_embeddings", None)
        if longest is not None and prompt_len + config.max_new_tokens > longest:
            raise ValueError(
                f"`max_new_tokens` must be at most {longest - prompt_len}: the model's positions end at "
                f"max_position_embeddings ({longest}) and the prompt has {prompt_len} tokens, got {config.max_new_tokens}"
            )
        if batch * config.num_return_sequences > MAX_ROWS:
            raise ValueError(
                f"`num_return_sequences` x batch must be at most {MAX_ROWS} rows, got {config.num_return_sequences} x {batch}"
            )
        if attention_mask is None and batch > 1 and bool((input_ids[:, 0] == config.pad_token_id).any()):
            raise ValueError("the batch is padded (a row starts with pad_token_id): pass its `attention_mask`")
        if config.use_cache and bool((input_ids == config.mask_token_id).any()):
            raise ValueError(
                "the prompt contains mask tokens, which prefilling (`use_cache=True`) would freeze: use "
                "`use_cache=False`, or put answer masks in `response_prior`"
            )
        pixel_values = arguments["pixel_values"]
        if torch.is_tensor(pixel_values) and pixel_values.dtype.is_floating_point and not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("`pixel_values` holds NaN or infinite values: check the image and its preprocessing")
        for name in ("generation_tokens_hook_func", "generation_logits_hook_func"):
            if arguments[name] is not None and not callable(arguments[name]):
                raise ValueError(f"`{name}` must be a callable (step, x, logits), got {type(arguments[name]).__name__}")
        processors = arguments["logits_processor"]
        if processors is not None and not callable(processors):
            raise ValueError(
                "`logits_processor` must be a `LogitsProcessorList` (or a callable (input_ids, scores) -> scores), got "
                f"{type(processors).__name__}"
            )
        past = arguments["past_key_values"]
        if past is not None:
            if not isinstance(past, DimpleConversationCache):
                raise ValueError(
                    "`past_key_values` must be the `past_key_values` of an earlier `diffusion_generate(..., "
                    f"return_dict_in_generate=True)` (a DimpleConversationCache), got {type(past).__name__}"
                )
            if past.batch_size != batch or config.num_return_sequences != 1:
                raise ValueError(
                    f"`past_key_values` holds {past.batch_size} conversations: continue them with as many rows of new "
                    f"tokens and num_return_sequences 1, got {batch} rows and num_return_sequences "
                    f"{config.num_return_sequences}"
                )
            if longest is not None and int(past.next_position.max()) + prompt_len + config.max_new_tokens > longest:
                raise ValueError(
                    f"`max_new_tokens` must be at most {longest - int(past.next_position.max()) - prompt_len}: the "
                    f"conversation so far takes {int(past.next_position.max())} positions and the new tokens "
                    f"{prompt_len}, and the model's positions end at max_position_embeddings ({longest})"
                )
        if arguments["show_progress"] not in (None, True, False):
            raise ValueError(f"`show_progress` must be True or False, got {arguments['show_progress']!r}")
        stopping = arguments["stopping_criteria"]
        stopping = [] if stopping is None else list(stopping) if isinstance(stopping, (list, tuple)) else [stopping]
        if not all(callable(c) for c in stopping):
            raise ValueError("`stopping_criteria` must be a callable (sequences, scores) -> bool tensor, or a list of them")
        streamer = arguments["streamer"]
        if isinstance(streamer, TextStreamer) and batch * config.num_return_sequences != 1:
            raise ValueError(
                "`streamer`: transformers' text streamers follow one answer (batch 1, num_return_sequences 1), got "
                f"{batch * config.num_return_sequences}; use a streamer with `settled_tokens = True` or whose `put` "
                "takes the canvases"
            )
        prior = self._response_prior(arguments["response_prior"], arguments["tokenizer"], input_ids, config)
        return DecodeRequest(
            config, input_ids, attention_mask, pixel_values, arguments["image_grid_thw"], prior,
            arguments["generation_tokens_hook_func"], arguments["generation_logits_hook_func"], streamer,
            arguments["generator"], stopping, processors, bool(arguments["show_progress"]), past,
        )

    @staticmethod
    def _checked_attention_mask(attention_mask, input_ids) -> Optional[torch.Tensor]:
        """The prompt's padding mask, left-padded, with a real token in every row; None when nothing is padded."""
        if attention_mask is None:
            return None
        if not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"`attention_mask` must be a tensor of the prompt's shape {tuple(input_ids.shape)}, got "
                + (f"shape {tuple(attention_mask.shape)}" if torch.is_tensor(attention_mask) else type(attention_mask).__name__)
            )
        mask = attention_mask.long()
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("`attention_mask` must hold 0 (padding) and 1 (token) only")
        empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"`attention_mask`: row {empty[0]} is all padding (rows {empty}): every prompt needs a token")
        # Left padding only: the answer canvas follows the last prompt token of every row.
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("`attention_mask` must be left-padded (zeros before a row's tokens, none after)")
        return None if bool(mask.all()) else attention_mask

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

    # ---------------------------------------------------------------- 2. prepare

    def _prepare_decode(self, request: DecodeRequest) -> PreparedDecode:
        """The sequences (prompt + canvas, with the prior), positions, attention mask, image embeddings (encoded
        once) and the model call; `alg` resolved into the scorer and the position chooser."""
        config, input_ids, attention_mask = request.config, request.input_ids, request.attention_mask
        n_rep, mask_id = config.num_return_sequences, config.mask_token_id
        device, (batch, prompt_len) = input_ids.device, input_ids.shape
        canvas_len = config.max_new_tokens
        total_len = prompt_len + canvas_len
        x = torch.full((batch * n_rep, total_len), mask_id, dtype=torch.long, device=device)
        x[:, :prompt_len] = input_ids.repeat_interleave(n_rep, 0)
        prior = request.prior
        if prior is not None:
            if prior.shape[0] not in (1, batch * n_rep):  # one row per prompt: repeat it for the prompt's answers
                prior = prior.repeat_interleave(n_rep, 0)
            x[:, prompt_len : prompt_len + prior.shape[1]] = prior  # a single row broadcasts to every row
        end_ids = end_of_text_ids(config, device)
        x[:, prompt_len:] = fill_after_end_of_text(x[:, prompt_len:], mask_id, end_ids, config.pad_token_id)

        full_mask = None if attention_mask is None else F.pad(attention_mask.long(), (0, canvas_len), value=1)
        position_ids, _ = self.get_rope_index(
            F.pad(input_ids, (0, canvas_len), value=mask_id), request.image_grid_thw, attention_mask=full_mask,
        )
        embeds = self.embed_inputs(input_ids, request.pixel_values, request.image_grid_thw)  # this turn's images only
        if full_mask is not None:
            full_mask = full_mask.repeat_interleave(n_rep, 0)
        past, past_len = request.past, 0
        conversation_mask = full_mask if full_mask is not None else torch.ones(batch * n_rep, total_len, dtype=torch.long, device=device)
        if past is not None:  # positions continue the conversation's; the earlier turns are keys only
            past_len = past.length
            position_ids = F.pad(position_ids + past.next_position.to(device)[None, :, None], (past_len, 0))
            conversation_mask = torch.cat([past.attention_mask.to(device).long(), conversation_mask], 1)
            full_mask = None if bool(conversation_mask.all()) else conversation_mask
        denoise = DenoisingForward(
            self, embeds.repeat_interleave(n_rep, 0), position_ids.repeat_interleave(n_rep, 1),
            self.prepare_attention_mask(full_mask, past_len + total_len, past_len + total_len), canvas_len, config.block_length,
            use_cache=config.use_cache, dual_cache=config.dual_cache,
            use_cuda_graph=config.use_cuda_graph and device.type == "cuda" and not self.is_split_across_devices(),
            use_torch_compile=config.use_torch_compile,
            lookahead=decode_block_length(config) if config.open_ended else None,
            past=None if past is None else past.key_values(self),
        )
        pipeline_class = PIPELINE_CLASSES[config.decoding_pipeline]
        scorer = PositionScorer(config, config.use_original_confidence and pipeline_class.original_confidence_allowed)
        streamer = request.streamer
        if streamer is not None and streams_settled_tokens(streamer):
            streamer = SettledTokenStream(streamer, input_ids.repeat_interleave(n_rep, 0), mask_id, end_ids)
        rows = batch * n_rep
        credit = CreditTrace(rows, canvas_len, device) if config.credit_decoding else None
        stable = StableCommit(config.commit_when_stable, rows, canvas_len, device) if config.commit_when_stable else None
        return PreparedDecode(
            x, prompt_len, denoise, scorer, pipeline_class, pipeline_class.make_chooser(config), end_ids, streamer,
            conversation_mask[:, : past_len + prompt_len], past, credit, stable,
        )

    # ---------------------------------------------------------------- 3. the loop

    def _denoise(self, request: DecodeRequest, prepared: PreparedDecode):
        config, x, prompt_len = request.config, prepared.x, prepared.prompt_len
        mask_id, tokens_hook, logits_hook = config.mask_token_id, request.tokens_hook, request.logits_hook
        vocab_size = self.get_input_embeddings().num_embeddings
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)  # rows not stopped
        problem = torch.zeros((), dtype=torch.bool, device=x.device)  # a check failed at the previous step
        history = [] if config.output_history else None
        scores = [] if config.output_scores else None
        raw_logits = [] if config.output_logits else None
        processors = request.logits_processor
        # The head at every position of the block (not only the scored ones): for what sees the block's logits.
        block_logits = tokens_hook is not None or logits_hook is not None or processors is not None \
            or scores is not None or raw_logits is not None
        progress = ProgressDisplay() if request.show_progress else None
        passes, streamer = 0, prepared.streamer
        drafts = streamer is not None and callable(getattr(getattr(streamer, "streamer", streamer), "put_draft", None))
        row_passes = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # passes in which a row had masks
        try:
            # q/k/v as one matrix product per layer while decoding (a stacked copy of their weights, freed after).
            with self.stacked_qkv_projections():
                if tokens_hook is not None:
                    x = hook_result("generation_tokens_hook_func", tokens_hook(None, x, None), x)
                    # an end-of-text the hook wrote ends the answer there, as one in `response_prior` does
                    x[:, prompt_len:] = fill_after_end_of_text(x[:, prompt_len:], mask_id, prepared.end_ids, config.pad_token_id)
                    problem = ((x < 0) | (x >= vocab_size)).any()
                block_length = decode_block_length(config)
                decoded_end = config.max_new_tokens
                for lo, hi, block_steps in plan_blocks(config.max_new_tokens, block_length, config.steps):
                    if config.open_ended and not bool(((x[:, prompt_len + lo :] == mask_id) & active[:, None]).any()):
                        decoded_end = lo  # every row has ended (or stopped): no block after this one is run
                        break
                    pipeline = prepared.pipeline_class(config, block_steps, x.device, chooser=prepared.chooser)
                    block = slice(prompt_len + lo, prompt_len + hi)
                    masks_start = (x[:, block] == mask_id).sum(-1)
                    first_pass_of_block = True  # its pass refreshes the cache (a skipped step runs none)
                    for step in range(block_steps):
                        is_mask = (x[:, block] == mask_id) & active[:, None]
                        masked, failed = masked_positions(is_mask, problem)
                        if failed:
                            self._raise_step_problem(passes, x, vocab_size)
                        if masked.numel() == 0:  # nothing left to decode in this block (or every row stopped)
                            break
                        if not block_logits and pipeline.commits_nothing(step, is_mask):
                            continue  # a pass whose result no row would use
                        hidden = prepared.denoise(x[:, prompt_len:], lo, hi, first_step_of_block=first_pass_of_block)
                        step_is_first, first_pass_of_block = first_pass_of_block, False
                        passes += 1
                        row_passes += is_mask.any(-1)
                        if not block_logits:  # the head only where a token is scored
                            logits = None
                            masked_logits = self.lm_head(hidden.flatten(0, 1).index_select(0, masked.to(hidden.device)))
                        else:  # hooks, processors and outputs see the whole block's logits
                            logits = self.lm_head(hidden)
                            if raw_logits is not None:
                                raw_logits.append(logits)
                            if processors is not None:  # transformers' (input_ids, scores): (batch, block, vocab)
                                logits = hook_result("logits_processor", processors(x, logits), logits)
                            if logits_hook is not None:
                                logits = hook_result("generation_logits_hook_func", logits_hook(passes - 1, x, logits), logits)
                            if scores is not None:
                                scores.append(logits)
                            masked_logits = logits.flatten(0, 1).index_select(0, masked.to(logits.device))
                        problem = non_finite_logits(masked_logits).to(x.device)
                        x[:, block], tokens = commit_pass(
                            prepared, pipeline, step, step_is_first, masked_logits, masked, is_mask, masks_start,
                            x[:, block], lo, hi, request.generator,
                        )
                        if config.stop_at_eos or config.open_ended:
                            x[:, prompt_len:] = fill_after_end_of_text(x[:, prompt_len:], mask_id, prepared.end_ids, config.pad_token_id)
                        if tokens_hook is not None:
                            x = hook_result("generation_tokens_hook_func", tokens_hook(passes - 1, x, logits), x)
                            problem = problem | ((x < 0) | (x >= vocab_size)).any()
                            if config.stop_at_eos or config.open_ended:  # an end-of-text it wrote ends the answer
                                x[:, prompt_len:] = fill_after_end_of_text(x[:, prompt_len:], mask_id, prepared.end_ids, config.pad_token_id)
                        done = stopped_rows(request.stopping_criteria, x)
                        if done is not None:
                            active = active & ~done
                        if history is not None:
                            history.append(x.clone())
                        if streamer is not None:
                            streamer.put(x[:, prompt_len:].clone())
                            if drafts:  # the canvas with this pass's predictions at the masks it left
                                draft = x[:, prompt_len:].clone()
                                draft[:, lo:hi] = torch.where(active[:, None], tokens, draft[:, lo:hi])
                                streamer.put_draft(draft)
                        if progress is not None:
                            progress.update(passes, int((x[:, prompt_len:] == mask_id).logical_and(active[:, None]).sum()))
                if bool(problem):  # the last step's checks (one host sync per decode)
                    self._raise_step_problem(passes, x, vocab_size)
        finally:  # also on an error, so that a consumer of TextIteratorStreamer is not left waiting
            if streamer is not None:
                streamer.end()
            if progress is not None:
                progress.end()
        if config.open_ended:  # up to the end of the last block decoded (later positions are padding)
            x = x[:, : prompt_len + decoded_end]
        if config.return_dict_in_generate:
            answer = x[:, prompt_len:]
            ended = torch.isin(answer, prepared.end_ids).cummax(dim=-1).values
            answer_tokens = (~ended & (answer != mask_id)).sum(-1)
            return DimpleGenerationOutput(
                past_key_values=self._conversation_cache(prepared, x, mask_id),
                sequences=x, history=tuple(history) if history is not None else None, num_forward_passes=passes,
                tokens_per_forward=answer_tokens / row_passes.clamp_min(1),
                scores=tuple(scores) if scores is not None else None,
                logits=tuple(raw_logits) if raw_logits is not None else None,
            )
        return x

    def _conversation_cache(self, prepared: PreparedDecode, x: torch.Tensor, mask_id: int) -> DimpleConversationCache:
        """The conversation after this decode: the earlier turns, this turn's prompt and its answer canvas, whose
        positions after a row's end-of-text (and any mask left) are padding."""
        prompt_len, denoise = prepared.prompt_len, prepared.denoise
        answer = x[:, prompt_len:]
        end = torch.isin(answer, prepared.end_ids)
        after_end = F.pad(end.cummax(dim=-1).values[:, :-1], (1, 0))
        real = ~after_end & (answer != mask_id)  # the positions after it are padding (no host sync to cut them)
        positions = denoise.position_ids[:, :, denoise.offset : denoise.offset + x.shape[1]]
        mask = torch.cat([prepared.conversation_mask, real.long()], 1)
        return DimpleConversationCache(prepared.past, denoise.embeds[:, :prompt_len], positions, mask, x)

    @staticmethod
    def _raise_step_problem(passes: int, x: torch.Tensor, vocab_size: int):
        """The check that failed at forward pass `passes` (found at the next host sync), as a clear error."""
        if bool(((x < 0) | (x >= vocab_size)).any()):
            raise ValueError(
                f"`generation_tokens_hook_func` wrote token ids outside the vocabulary [0, {vocab_size}) "
                f"(after forward pass {passes})"
            )
        raise ValueError(
            f"the model's logits at forward pass {passes} are not finite (NaN or inf, or every token -inf): check "
            "the weights, the inputs and any `generation_logits_hook_func`"
        )


# --------------------------------------------------------------------------------------------------
# Step-level continuous batching: decodes joining and leaving a running batch between passes
# --------------------------------------------------------------------------------------------------


@dataclass
class RunningRow:
    """One decode of a `RunningDecodeBatch`: its request, what `_prepare_decode` made of it, and where its own
    loop stands (block, step, whether its cache holds its keys yet)."""

    key: object
    request: DecodeRequest
    prepared: PreparedDecode
    prompt_len: int
    canvas_len: int
    blocks: list
    block_index: int = 0
    step: int = 0
    pipeline: object = None
    masks_start: Optional[torch.Tensor] = None
    first_pass_of_block: bool = True
    cache_filled: bool = False
    passes: int = 0
    is_mask: Optional[torch.Tensor] = None  # (1, block) the masks its next pass scores; None once finished
    error: Optional[str] = None


@dataclass
class RowUpdate:
    """A row after a `RunningDecodeBatch.step`: its answer canvas (`(canvas,)` token ids; masks where nothing is
    committed yet), the passes it took part in, and whether it has finished (it has then left the batch)."""

    key: object
    canvas: torch.Tensor
    passes: int
    finished: bool
    error: Optional[str] = None


# What a running batch cannot carry: per-pass callbacks and outputs of one call, the growing canvas of open-ended
# decoding (its passes change shape block by block), conversations, and several answers per prompt.
RUNNING_BATCH_REFUSED = {
    "generation_tokens_hook_func": "a per-call hook", "generation_logits_hook_func": "a per-call hook",
    "logits_processor": "per-call logits processors", "streamer": "a streamer (read `step()`'s canvases)",
    "stopping_criteria": "stopping criteria (call `remove(key)`)", "past_key_values": "a conversation cache",
}


class RunningDecodeBatch:
    """Decodes that join and leave one running batch between denoising passes (step-level continuous
    batching, as SGLang and vLLM schedule their diffusion models).

        batch = model.running_batch()
        batch.add("a", **processor(...), max_new_tokens=48)
        while len(batch):
            for update in batch.step():        # one pass for every row that needs one
                ...                            # update.canvas, update.finished
            batch.add("b", ...)                # joins before the next pass; batch.remove("a") leaves at once

    Every row runs its own `diffusion_generate` loop: its own blocks, steps, schedule (`DimPipeline` /
    `DreamPipeline`), cache state and generator, with the settings given to `add` (rows of different settings
    share the batch). `step()` runs, for every row, the pass its loop is at, rows whose passes have the same
    query positions in one forward, and commits with the loop's own rule (`commit_pass`). So a row's tokens are
    those of decoding it alone with `diffusion_generate` (greedy; a sampled row's, given its own `generator`).

    Layout: rows are left-padded to a common prompt width and right-padded to a common canvas width (the padding
    is masked out of attention; positions are each row's own); every row's canvas starts at the same index, so
    a prefilled pass ("tail") of every row, whatever its prompt, is one forward. The layout widens when a longer
    prompt or canvas joins and tightens when the batch empties. Not supported in a running batch: open-ended
    decoding, `num_return_sequences` > 1, hooks, logits processors, streamers, stopping criteria, conversation
    caches (`ValueError` from `add`).
    """

    def __init__(self, model, max_rows: Optional[int] = None):
        if max_rows is not None and (not _is_int(max_rows) or max_rows < 1):
            raise ValueError(f"`max_rows` must be a positive integer or None, got {max_rows!r}")
        self.model, self.max_rows = model, max_rows
        self.rows: list = []
        self.prompt_width = self.canvas_width = 0
        self.tokens = self.embeds = self.position_ids = self.key_mask = None
        self.key_values: list = []  # per layer (rows, width, 2 * kv_heads, head_dim), allocated at the first pass
        self._qkv = None  # the stacked q/k/v projections' context, held while the batch has rows
        self._masks: dict = {}  # (rows, start, end) -> attention mask, built once per layout

    @property
    def key_mask(self) -> Optional[torch.Tensor]:
        """(rows, width) True where a row has a token (prompt or canvas), False on the layout's padding."""
        return self._key_mask

    @key_mask.setter
    def key_mask(self, value: Optional[torch.Tensor]) -> None:
        self._key_mask = value
        self._masks = {}  # rows joined, left or widened: the masks are built again, once

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key) -> bool:
        return any(row.key == key for row in self.rows)

    @property
    def width(self) -> int:
        return self.prompt_width + self.canvas_width

    # ---------------------------------------------------------------- joining and leaving

    def add(self, key, inputs=None, generation_config=None, **kwargs) -> None:
        """A decode joins the batch (its first pass is at the next `step`): `inputs` and keyword arguments as
        `diffusion_generate`'s, one prompt (batch 1). Checked before anything runs; `ValueError` naming the
        argument."""
        if key in self:
            raise ValueError(f"`key` {key!r} is already decoding in this batch")
        if self.max_rows is not None and len(self.rows) >= self.max_rows:
            raise ValueError(f"the running batch is full ({self.max_rows} rows, `max_rows`): remove a row first")
        for name, what in RUNNING_BATCH_REFUSED.items():
            if kwargs.get(name) is not None:
                raise ValueError(f"`{name}`: {what} is not supported in a running batch")
        request = self.model._validate_request(inputs, generation_config, kwargs)
        config = request.config
        if request.input_ids.shape[0] != 1 or config.num_return_sequences != 1:
            raise ValueError(
                f"a running batch takes one prompt and one answer per `add` (input_ids batch 1, num_return_sequences "
                f"1), got batch {request.input_ids.shape[0]} and num_return_sequences {config.num_return_sequences}"
            )
        if config.open_ended:
            raise ValueError("`open_ended`: not supported in a running batch: give a fixed `max_new_tokens`")
        for name in ("output_history", "output_scores", "output_logits"):  # per-call outputs `step()` never returns
            if getattr(config, name):
                raise ValueError(f"`{name}`: not supported in a running batch (read `step()`'s canvases)")
        if self._qkv is None:
            self._qkv = self.model.stacked_qkv_projections()
            self._qkv.__enter__()
        prepared = self.model._prepare_decode(request)
        prompt_len, canvas_len = prepared.prompt_len, config.max_new_tokens
        self._widen(max(self.prompt_width, prompt_len), max(self.canvas_width, canvas_len))
        device, width, start = prepared.x.device, self.width, self.prompt_width - prompt_len
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        tokens = torch.full((1, width), pad, dtype=torch.long, device=device)
        tokens[:, start : start + prompt_len + canvas_len] = prepared.x
        key_mask = torch.zeros(1, width, dtype=torch.bool, device=device)
        prompt_mask = request.attention_mask
        key_mask[:, start : start + prompt_len] = True if prompt_mask is None else prompt_mask.bool()
        key_mask[:, self.prompt_width : self.prompt_width + canvas_len] = True
        denoise = prepared.denoise
        embeds = denoise.embeds.new_zeros(1, width, denoise.embeds.shape[-1])
        embeds[:, start : self.prompt_width] = denoise.embeds[:, :prompt_len]
        position_ids = torch.zeros(3, 1, width, dtype=denoise.position_ids.dtype, device=device)
        position_ids[:, :, start : start + prompt_len + canvas_len] = denoise.position_ids
        prepared.denoise = None  # its buffers are copied: the batch's tensors hold the row from now on
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens])
        self.key_mask = key_mask if self.key_mask is None else torch.cat([self.key_mask, key_mask])
        self.embeds = embeds if self.embeds is None else torch.cat([self.embeds, embeds])
        self.position_ids = position_ids if self.position_ids is None else torch.cat([self.position_ids, position_ids], 1)
        self.key_values = [torch.cat([kv, kv.new_zeros(1, *kv.shape[1:])]) for kv in self.key_values]
        row = RunningRow(key, request, prepared, prompt_len, canvas_len,
                         plan_blocks(canvas_len, decode_block_length(config), config.steps))
        self.rows.append(row)
        self._advance(row, len(self.rows) - 1)

    def remove(self, key) -> None:
        """The row leaves the batch now (a cancelled or stopped request): its slot is free for the next `add`."""
        index = next((i for i, row in enumerate(self.rows) if row.key == key), None)
        if index is None:
            raise ValueError(f"`key` {key!r} is not decoding in this batch")
        self._drop([index])

    def _drop(self, indices: list) -> None:
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:  # empty: the layout starts again from the next row's widths
            self.prompt_width = self.canvas_width = 0
            self.tokens = self.embeds = self.position_ids = self.key_mask = None
            self.key_values = []
            if self._qkv is not None:
                self._qkv.__exit__(None, None, None)
                self._qkv = None
            return
        index = torch.tensor(keep, device=self.tokens.device)
        self.tokens, self.key_mask = self.tokens[index], self.key_mask[index]
        self.embeds, self.position_ids = self.embeds[index], self.position_ids[:, index]
        self.key_values = [kv[index] for kv in self.key_values]

    def _widen(self, prompt_width: int, canvas_width: int) -> None:
        """Left-pad every row to `prompt_width` and right-pad to `canvas_width` (masked out of attention)."""
        left, right = prompt_width - self.prompt_width, canvas_width - self.canvas_width
        self.prompt_width, self.canvas_width = prompt_width, canvas_width
        if self.tokens is None or (left == 0 and right == 0):
            return
        self.tokens = F.pad(self.tokens, (left, right))  # padding: never a query that is read, never a key
        self.key_mask = F.pad(self.key_mask, (left, right), value=False)
        self.embeds = F.pad(self.embeds, (0, 0, left, right))
        self.position_ids = F.pad(self.position_ids, (left, right))
        self.key_values = [F.pad(kv, (0, 0, 0, 0, left, right)) for kv in self.key_values]

    # ---------------------------------------------------------------- the step

    def _advance(self, row: RunningRow, index: int) -> None:
        """Move the row's loop to its next pass (as `_denoise`: a block with no mask left, or whose steps are
        spent, ends; a step whose schedule commits nothing is skipped), setting `row.is_mask`; None: finished."""
        config, mask_id = row.request.config, row.request.config.mask_token_id
        canvas = self.tokens[index : index + 1, self.prompt_width : self.prompt_width + row.canvas_len]
        while row.block_index < len(row.blocks):
            lo, hi, block_steps = row.blocks[row.block_index]
            if row.pipeline is None:
                row.pipeline = row.prepared.pipeline_class(config, block_steps, canvas.device, chooser=row.prepared.chooser)
                row.masks_start = (canvas[:, lo:hi] == mask_id).sum(-1)
                row.first_pass_of_block, row.step = True, 0
            if row.step < block_steps:
                is_mask = canvas[:, lo:hi] == mask_id
                if bool(is_mask.any()):
                    if not row.pipeline.commits_nothing(row.step, is_mask):
                        row.is_mask = is_mask
                        return
                    row.step += 1
                    continue
            row.block_index, row.pipeline = row.block_index + 1, None
        row.is_mask = None

    def _queries(self, row: RunningRow) -> tuple:
        """The query positions `[start, end)` of the row's next pass in the batch's layout (`DenoisingForward`'s
        choice: a full pass without a cache, to fill it, or to refresh the dual cache without a frozen prompt; the
        window of the dual cache inside a block; else the prefilled tail)."""
        config = row.request.config
        cached = config.use_cache or config.dual_cache
        lo, hi, _ = row.blocks[row.block_index]
        if not cached or not row.cache_filled or (config.dual_cache and row.first_pass_of_block and not config.use_cache):
            row.cache_filled = cached
            return 0, self.width
        if config.dual_cache and not row.first_pass_of_block:
            return self.prompt_width - 1 + lo, self.prompt_width + hi
        return self.prompt_width - 1, self.width

    def _forward(self, indices: list, start: int, end: int) -> torch.Tensor:
        """One forward of rows `indices` over query positions `[start, end)`, their cached keys/values read and
        the positions run rewritten; the final hidden states `(rows, end - start, hidden)`."""
        model, device = self.model, self.tokens.device
        whole = len(indices) == len(self.rows)
        index = None if whole else torch.tensor(indices, device=device)
        pick = (lambda t, dim=0: t) if whole else (lambda t, dim=0: t.index_select(dim, index))
        queries = torch.arange(start, end, device=device)
        cached = (tuple(indices), start, end)
        if cached not in self._masks:  # not rebuilt (nor a host sync) at every pass
            key_mask = pick(self.key_mask)
            self._masks[cached] = None if bool(key_mask.all()) else model.prepare_attention_mask(
                key_mask, end - start, self.width, queries)
        mask = self._masks[cached]
        cache = model.new_prefix_cache(self.width)
        cache.key_values = [pick(kv) for kv in self.key_values]  # the rows' own (a copy for a subset of rows)
        hidden = model.decoder_forward(
            inputs_embeds=pick(self.embeds)[:, start:end], attention_mask=mask,
            position_ids=pick(self.position_ids, 1)[:, :, start:end], past_key_values=cache, cache_position=queries,
        )[0]
        written = cache.key_values
        if not self.key_values:  # the first pass allocates the batch's cache
            self.key_values = [kv.new_zeros(len(self.rows), *kv.shape[1:]) for kv in written]
        if whole:
            self.key_values = written
        else:
            for kv, new in zip(self.key_values, written):
                kv.index_copy_(0, index, new)
        return hidden

    def step(self) -> list:
        """One denoising pass for every row that needs one; returns a `RowUpdate` per row. Finished rows (no mask
        left, or their steps spent) have left the batch when it returns."""
        updates, finished = {}, []
        if not self.rows:
            return []
        canvas = slice(self.prompt_width, self.width)
        self.embeds[:, canvas] = self.model.get_input_embeddings()(self.tokens[:, canvas])
        groups: dict = {}
        for i, row in enumerate(self.rows):
            if row.is_mask is not None:
                groups.setdefault(self._queries(row), []).append(i)
        predicted = []  # (row index, hidden states predicting the row's masks)
        for (start, end), indices in groups.items():
            hidden = self._forward(indices, start, end)
            for j, i in enumerate(indices):
                row = self.rows[i]
                lo, hi, _ = row.blocks[row.block_index]
                first = self.prompt_width - 1 + lo - start  # the query that predicts the block's first position
                masked = row.is_mask[0].nonzero().squeeze(-1)
                predicted.append((i, masked, hidden[j, first : first + hi - lo].index_select(0, masked)))
        if predicted:
            all_logits = self.model.lm_head(torch.cat([h for _, _, h in predicted]))
            offset = 0
            for i, masked, h in predicted:
                logits, offset = all_logits[offset : offset + h.shape[0]], offset + h.shape[0]
                self._commit(i, masked, logits)
        for i, row in enumerate(self.rows):
            if row.error is None:
                self._advance(row, i)
            start = self.prompt_width
            updates[i] = RowUpdate(row.key, self.tokens[i, start : start + row.canvas_len].clone(), row.passes,
                                   row.is_mask is None or row.error is not None, row.error)
            if updates[i].finished:
                finished.append(i)
        result = [updates[i] for i in range(len(self.rows))]
        if finished:
            self._drop(finished)
        return result

    def _commit(self, index: int, masked: torch.Tensor, logits: torch.Tensor) -> None:
        """The row's pass: the loop's commit rule on its masked logits (`commit_pass`), end-of-text filling."""
        row = self.rows[index]
        config, prepared = row.request.config, row.prepared
        if bool(non_finite_logits(logits)):
            row.error = (f"the model's logits at forward pass {row.passes + 1} are not finite (NaN or inf, or every "
                         "token -inf): check the weights and the inputs")
            return
        lo, hi, _ = row.blocks[row.block_index]
        start = self.prompt_width
        block = slice(start + lo, start + hi)
        self.tokens[index : index + 1, block], _ = commit_pass(
            prepared, row.pipeline, row.step, row.first_pass_of_block, logits, masked, row.is_mask, row.masks_start,
            self.tokens[index : index + 1, block], lo, hi, row.request.generator,
        )
        if config.stop_at_eos:
            answer = slice(start, start + row.canvas_len)
            self.tokens[index : index + 1, answer] = fill_after_end_of_text(
                self.tokens[index : index + 1, answer], config.mask_token_id, prepared.end_ids, config.pad_token_id)
        row.step, row.first_pass_of_block, row.passes = row.step + 1, False, row.passes + 1
