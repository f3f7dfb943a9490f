"""Reward functions for `dimple-train --stage grpo`, in TRL's convention: `(prompts, completions, **sample) ->
list[float]`, one reward per completion; `completions` are texts or TRL's conversational completions
(`[{"role": "assistant", "content": ...}]`), the sample's columns (here `answer`, the reference) come as keywords.

Built in, for the shapes task the tiny model is trained on (dimple_tools/tiny/task.py):
- `shapes_exact_match`: 1 when the answer is exactly the reference (up to case, whitespace, final punctuation).
- `shapes_partial_credit`: for a scene description, the share of the scene's shapes named with their colour,
  shape and position, less one share per shape named at an empty cell (`task.shapes_correct`); other questions
  score as exact match.

A reward for your own data is a plain function of the same shape (docs/training.md), passed as
`--reward_funcs my_package.rewards:my_reward`.
"""

from dimple_tools.tiny.task import answer_is_correct, parse_description, shapes_correct


def completion_text(completion) -> str:
    """The text of a completion: a string, or the content of TRL's conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise ValueError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def shapes_exact_match(prompts, completions, answer, **sample) -> list:
    return [float(answer_is_correct(completion_text(c), reference)) for c, reference in zip(completions, answer)]


def shapes_partial_credit(prompts, completions, answer, **sample) -> list:
    return [shapes_correct(completion_text(c), reference) if parse_description(reference) is not None
            else float(answer_is_correct(completion_text(c), reference))
            for c, reference in zip(completions, answer)]


BUILTIN = {"shapes_exact_match": shapes_exact_match, "shapes_partial_credit": shapes_partial_credit}
