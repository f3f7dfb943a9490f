"""Decoding settings and prompts of Dimple's lmms-eval model class (`dimple_tools.evaluation.model`).

Kept apart from the class, which needs lmms-eval installed, so that these rules can be read and tested with
the model's own packages alone. See the class module's docstring for how lmms-eval's generation kwargs become
`diffusion_generate` settings.
"""

from __future__ import annotations

import re

#: The release's evaluation settings (yu-rp/Dimple, lmms-eval/examples/models/dimple.sh): every benchmark with
#: an 8-token canvas decoded in 8 steps.
RELEASE_SETTINGS = {
    "max_new_tokens": 8,
    "steps": 8,
    "temperature": 0.0,
    "top_p": 0.01,
    "alg": "maskgit_plus",
    "alg_temp": 0.0,
    "alg_p_threshold": 0.0,
    "use_original_confidence": False,
    "use_cache": True,
    "decoding_pipeline": "dream",
}
#: Canvas (and steps) of open-ended tasks: the release's MM-Vet setting.
OPEN_ENDED_LENGTH = 64
#: Tasks whose answers are free text judged by a model or a caption metric, matched on the lmms-eval task name
#: (a name equal to one of these or starting with it plus "_"). Extend with `open_ended_tasks=a+b`, or set the
#: canvas yourself with `--gen_kwargs max_new_tokens=N,steps=N`, or decode open-ended up to a bound with
#: `--gen_kwargs open_ended=true,max_new_tokens=256,steps=256` (the release's evaluation used the fixed 64 canvas).
OPEN_ENDED_TASKS = (
    "mmvet", "llava_in_the_wild", "llava_wilder", "llava_bench_coco", "vibe_eval", "wildvision", "mia_bench",
    "coco_cap", "coco2014_cap", "coco2017_cap", "nocaps", "flickr30k", "textcaps", "detailcaps",
)
#: Dimple's own settings: taken from every request that gives them (no task YAML sets them).
DIFFUSION_KEYS = (
    "steps", "alg", "alg_temp", "alg_p_threshold", "decoding_pipeline", "use_original_confidence", "use_cache",
    "block_length", "dual_cache", "stop_at_eos", "eps", "top_k", "open_ended",
)
#: Settings task YAMLs give autoregressive models; Dimple's only where the request also sets `steps`.
TASK_KEYS = ("max_new_tokens", "temperature", "top_p", "do_sample", "seed")
#: Autoregressive-only options, accepted at their neutral value (which changes nothing) and refused otherwise.
NEUTRAL_VALUES = {
    "num_beams": (1, None),
    "repetition_penalty": (1, 1.0, None),
    "length_penalty": (1, 1.0, None),
    "no_repeat_ngram_size": (0, None),
    "num_return_sequences": (1, None),
}
#: Options of lmms-eval or of other models that do not concern decoding: ignored.
IGNORED_KEYS = ("image_aspect_ratio", "skip_special_tokens", "visual_cot", "max_agentic_steps", "videos")
_NONE_STRINGS = ("none", "null")
_VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v", ".gif")
_AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a")


class DimpleEvalError(ValueError):
    """A request Dimple cannot answer correctly (refused with the reason rather than scored wrong)."""


def _none(value):
    return None if isinstance(value, str) and value.strip().lower() in _NONE_STRINGS else value


def _integral(value):
    """lmms-eval parses "8" as 8 but "8.0" as 8.0, and YAML may give either: whole floats become ints."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def as_bool(name, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if value in (0, 1):
        return bool(value)
    raise DimpleEvalError(f"`{name}` must be true or false, got {value!r}")


def is_open_ended(task: str, extra: tuple[str, ...] = ()) -> bool:
    """Whether `task` (an lmms-eval task name) is decoded with the open-ended canvas."""
    return any(task == name or task.startswith(name + "_") for name in (*OPEN_ENDED_TASKS, *extra))


def decoding_settings(task: str, gen_kwargs: dict | None, open_ended_extra: tuple[str, ...] = ()):
    """The request's generation kwargs -> (diffusion_generate settings, stop strings, seed, ignored task settings).

    `ignored` maps the task YAML's autoregressive settings that were replaced by the defaults (requests without
    `steps`) to their values. Raises `DimpleEvalError` for settings Dimple cannot apply.
    """
    kwargs = {key: _none(value) for key, value in dict(gen_kwargs or {}).items()}
    until = kwargs.pop("until", None)
    stop_sequences = kwargs.pop("stop_sequences", None)
    stops = []
    for value in (until, stop_sequences):
        if value is None:
            continue
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise DimpleEvalError(f"`until` must be a string or a list of strings, got {value!r}")
        stops.extend(v for v in value if v)

    settings = dict(RELEASE_SETTINGS)
    if is_open_ended(task, open_ended_extra):
        settings.update(max_new_tokens=OPEN_ENDED_LENGTH, steps=OPEN_ENDED_LENGTH)
    chosen = "steps" in kwargs  # the mark of settings written for Dimple, not the task's autoregressive ones
    for key in DIFFUSION_KEYS:
        if key in kwargs:
            settings[key] = _integral(kwargs.pop(key))
    task_values = {key: kwargs.pop(key) for key in TASK_KEYS if key in kwargs}
    neutral = {key: kwargs.pop(key) for key in NEUTRAL_VALUES if key in kwargs}
    for key in IGNORED_KEYS:
        value = kwargs.pop(key, None)
        if key == "videos" and value not in (None, [], ()):
            raise DimpleEvalError("Dimple evaluates images only: `videos` cannot be given")
    if kwargs:
        raise DimpleEvalError(
            f"unknown generation settings for Dimple: {sorted(kwargs)}; its settings are "
            f"{sorted(('max_new_tokens', 'temperature', 'top_p', 'do_sample', 'seed', 'until') + DIFFUSION_KEYS)}"
        )
    for key in ("use_cache", "use_original_confidence", "dual_cache", "stop_at_eos", "open_ended"):
        if key in settings:
            settings[key] = as_bool(key, settings[key])

    seed, ignored = None, {}
    if not chosen:
        ignored = {**task_values, **neutral}
        return settings, stops, seed, ignored

    for key, value in neutral.items():
        value = _integral(value)
        if value not in NEUTRAL_VALUES[key]:
            raise DimpleEvalError(
                f"`{key}={value}` would change an autoregressive decoding and has no diffusion counterpart; Dimple "
                f"accepts only {key}={NEUTRAL_VALUES[key][0]} (pass it in --gen_kwargs to replace the task's value)"
            )
    if "max_new_tokens" in task_values:
        settings["max_new_tokens"] = _integral(task_values["max_new_tokens"])
    seed = task_values.get("seed")
    # transformers' switch `do_sample` and Dimple's temperature (sampling is temperature > 0).
    do_sample = task_values.get("do_sample")
    temperature = task_values.get("temperature", settings["temperature"] if do_sample is None else None)
    if do_sample is not None:
        do_sample = as_bool("do_sample", do_sample)
        if not do_sample:
            temperature = 0.0  # greedy, as transformers' generate decodes with do_sample=False at any temperature
        elif temperature is None:
            temperature = 1.0  # transformers' default sampling temperature
        elif temperature == 0:
            raise DimpleEvalError("`do_sample=True` with `temperature=0`: sampling needs a temperature > 0")
    settings["temperature"] = 0.0 if temperature is None else float(temperature)
    if "top_p" in task_values:
        top_p = task_values["top_p"]
        if top_p is not None and top_p <= 0:
            # A nucleus of zero mass is the most probable token alone (what greedy callers mean by top_p=0).
            settings["top_p"], settings["top_k"] = None, 1
        else:
            settings["top_p"] = None if top_p is None or top_p >= 1 else float(top_p)
    return settings, stops, seed, ignored


def visual_kind(visual) -> str | None:
    """"video" / "audio" for inputs Dimple cannot take, None for images."""
    if isinstance(visual, dict):
        if "array" in visual and "sampling_rate" in visual:
            return "audio"
        if visual.get("type") in ("video", "audio"):
            return visual["type"]
        return "video" if "video" in visual else None
    if isinstance(visual, str):
        lower = visual.lower().split("?")[0]
        if lower.endswith(_VIDEO_SUFFIXES):
            return "video"
        if lower.endswith(_AUDIO_SUFFIXES):
            return "audio"
    return None


def flatten_visuals(visuals) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    flat = []
    for visual in visuals:
        flat.extend(flatten_visuals(visual) if isinstance(visual, (list, tuple)) else [visual])
    return flat


_NUMBERED_PLACEHOLDER = re.compile(r"<image (\d+)>")
_PLAIN_PLACEHOLDER = "<image>"


def build_content(context: str, images: list) -> list[dict]:
    """The user turn's content items: text and images, interleaved where the context says where they go.

    * `<image N>` placeholders (MMMU): the numbers, in increasing order, name the task's images in order (or, when
      their count differs from the images', image N is the N-th, clamped as the release did); every placeholder
      is replaced by its image, and images no placeholder names come first.
    * `<image>` placeholders, as many as images: each in turn.
    * Otherwise (most tasks): all images, then the text.
    """
    numbered = _NUMBERED_PLACEHOLDER.findall(context)
    if numbered and images:
        numbers = sorted({int(n) for n in numbered})
        if len(numbers) == len(images):
            index_of = {n: i for i, n in enumerate(numbers)}
        else:
            index_of = {n: min(max(n - 1, 0), len(images) - 1) for n in numbers}
        parts = _NUMBERED_PLACEHOLDER.split(context)  # text, number, text, number, ..., text
        used = set(index_of.values())
        content = [{"type": "image", "image": image} for i, image in enumerate(images) if i not in used]
        for k, part in enumerate(parts):
            if k % 2:
                content.append({"type": "image", "image": images[index_of[int(part)]]})
            elif part:
                content.append({"type": "text", "text": part})
        return content
    if images and context.count(_PLAIN_PLACEHOLDER) == len(images):
        parts = context.split(_PLAIN_PLACEHOLDER)
        content = []
        for k, part in enumerate(parts):
            if part:
                content.append({"type": "text", "text": part})
            if k < len(images):
                content.append({"type": "image", "image": images[k]})
        return content
    text = context.replace(_PLAIN_PLACEHOLDER, "")
    return [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
