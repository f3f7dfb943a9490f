"""Two-turn questions about one image on the tiny model: the second turn over the first turn's
`past_key_values` against re-encoding the whole conversation.

    dimple-bench multi-turn                     # tiny-dimple/, 100 images, both orders of the two questions
    python -m dimple_tools.bench.multi_turn --n 200 --out benchmarks/multi_turn_tiny.json

Per held-out image (seed 1) two conversations: "How many shapes are there?" then "Describe the image.", and the
reverse. Turn 1 is decoded once; turn 2 is decoded (a) with only its own tokens over turn 1's cache and (b) from
the whole conversation as one prompt (the image encoded again, every position seeing every other). Printed and
written: turn-2 accuracy, how many answers (a) and (b) share, and CPU milliseconds and forward passes per turn-2
answer ((a)'s milliseconds include the one pass that computes turn 1's keys/values, which its pass count does
not).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from dimple_tools.paths import REPOSITORY_ROOT, TINY_MODEL_DIR
from dimple_tools.tiny.build import HELD_OUT_SEED
from dimple_tools.tiny.task import answer_for, answer_is_correct, generate_samples

DEFAULT_OUT = REPOSITORY_ROOT / "benchmarks" / "multi_turn_tiny.json"
COUNT, DESCRIBE = "How many shapes are there?", "Describe the image."
ORDERS = {"count_then_describe": ((COUNT, "count"), (DESCRIBE, "describe")),
          "describe_then_count": ((DESCRIBE, "describe"), (COUNT, "count"))}


def user(text: str, image: bool = False) -> dict:
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def two_turns(model, processor, image, first_question: str, second_question: str) -> dict:
    """Turn 1, then turn 2 over its cache and from the whole conversation: answers, passes and seconds."""
    end_of_turn = processor.tokenizer.eos_token
    first_prompt = processor.apply_chat_template([user(first_question, image=True)], add_generation_prompt=True)
    inputs = processor(images=[image], text=first_prompt, return_tensors="pt")
    first = model.diffusion_generate(**inputs, return_dict_in_generate=True)
    first_answer = processor.decode_answers(first.sequences[0], prompt_length=inputs["input_ids"].shape[1])
    conversation = [user(first_question, image=True),
                    {"role": "assistant", "content": [{"type": "text", "text": first_answer}]}, user(second_question)]
    whole = processor.apply_chat_template(conversation, add_generation_prompt=True)
    cached_text = first_prompt + first_answer + end_of_turn
    if not whole.startswith(cached_text):
        raise RuntimeError(f"the chat template does not continue turn 1 as cached: {whole!r}")
    new = processor.tokenizer(whole[len(cached_text):], add_special_tokens=False, return_tensors="pt")
    start = time.perf_counter()
    cached = model.diffusion_generate(new["input_ids"], past_key_values=first.past_key_values, return_dict_in_generate=True)
    cached_seconds = time.perf_counter() - start
    full = processor(images=[image], text=whole, return_tensors="pt")
    start = time.perf_counter()
    encoded = model.diffusion_generate(**full, return_dict_in_generate=True)
    encoded_seconds = time.perf_counter() - start
    return {
        "cached": processor.decode_answers(cached.sequences[0], prompt_length=new["input_ids"].shape[1]),
        "re_encoded": processor.decode_answers(encoded.sequences[0], prompt_length=full["input_ids"].shape[1]),
        "cached_passes": cached.num_forward_passes, "re_encoded_passes": encoded.num_forward_passes,
        "cached_seconds": cached_seconds, "re_encoded_seconds": encoded_seconds,
        "new_tokens": new["input_ids"].shape[1], "conversation_tokens": full["input_ids"].shape[1],
    }


def measure(model, processor, n: int) -> list:
    samples = generate_samples(n, seed=HELD_OUT_SEED, question_type="describe")
    rows = []
    for order, ((first_question, _), (second_question, second_type)) in ORDERS.items():
        results = []
        with torch.no_grad():
            for image, _, _, meta in samples:
                result = two_turns(model, processor, image, first_question, second_question)
                result["truth"] = answer_for(second_type, meta["shapes"])
                results.append(result)
        count = len(results)
        row = {"conversation": order, "n": count}
        for way in ("cached", "re_encoded"):
            row[f"{way}_accuracy"] = sum(answer_is_correct(r[way], r["truth"]) for r in results) / count
            row[f"{way}_passes_per_answer"] = sum(r[f"{way}_passes"] for r in results) / count
            row[f"{way}_ms_per_answer"] = round(1000 * sum(r[f"{way}_seconds"] for r in results) / count, 2)
        row["same_answers"] = sum(r["cached"] == r["re_encoded"] for r in results)
        row["mean_new_tokens"] = sum(r["new_tokens"] for r in results) / count
        row["mean_conversation_tokens"] = sum(r["conversation_tokens"] for r in results) / count
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="dimple-bench multi-turn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TINY_MODEL_DIR), help="checkpoint folder (default: tiny-dimple/)")
    parser.add_argument("--n", type=int, default=100, help="held-out images (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be an integer >= 1, got {args.n}")
    if args.threads < 1:
        parser.error(f"--threads must be an integer >= 1, got {args.threads}")
    from transformers import AutoModel, AutoProcessor

    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    rows = measure(model, processor, args.n)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
