"""Ask Dimple questions about an image from the command line.

    dimple-demo                                   # the shipped tiny-dimple/ on a sample image
    dimple-demo --model path/or/hub-id --image photo.jpg --question "Describe this image."

Answers are decoded open-ended (the canvas grows until the answer's end-of-text, up to --max-new-tokens, 256 by
default), with a progress line on stderr; --no-open-ended decodes the checkpoint's fixed canvas (--max-new-tokens
then sets it). Decoding settings left out (--use-cache / --no-use-cache, --steps, --alg-p-threshold) are the
checkpoint's (its generation_config.json).

Loads the model and processor through `AutoModel` / `AutoProcessor` with `trust_remote_code`, exactly as a
user of the published checkpoint would, and prints each question, answer, forward passes and time.
"""

import argparse
import math
import pathlib
import time

import torch
from transformers import AutoModel, AutoProcessor

from dimple_tools.compat import dtype_argument
from dimple_tools.length import DEFAULT_BOUND, open_ended_settings
from dimple_tools.paths import REPOSITORY_ROOT

ROOT = REPOSITORY_ROOT  # the repository (tiny-dimple/ and the assets)
# About the tiny model's sample scene (four shapes on a 3 x 3 grid): a long answer, a count and a position.
DEFAULT_QUESTIONS = ("Describe the image.", "How many shapes are there?", "What is at the top left?")


def sample_image():
    from dimple_tools.tiny.task import sample_image as make

    return make()


def load(model_path):
    """(model, processor) loaded as users do (`trust_remote_code`), on the GPU in bf16 when there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    processor = AutoProcessor.from_pretrained(str(model_path), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(model_path), trust_remote_code=True, **dtype_argument(dtype))
    return model.to(device).eval(), processor


def answer(model, processor, image, question: str, split_special_tokens=False, **generate_kwargs):
    """(answer, forward passes, seconds) for one question about one image. With `split_special_tokens=True` the
    question is plain text: special-token strings in it (`<|im_end|>`, `<|mask|>`, ...) are not special tokens."""
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        **({"split_special_tokens": True} if split_special_tokens else {}),
    ).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    start = time.perf_counter()
    out = model.diffusion_generate(**inputs, return_dict_in_generate=True, **generate_kwargs)
    seconds = time.perf_counter() - start
    text = processor.decode_answers(out.sequences[0], prompt_length=inputs["input_ids"].shape[1])
    return text, out.num_forward_passes, seconds


def check_args(parser, args):
    """Reject bad values with `parser.error` (usage, the flag and its allowed values; exit code 2) before
    anything is loaded."""
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--steps", args.steps)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be an integer >= 1, got {value}")
    threshold = args.alg_p_threshold
    if threshold is not None and not (math.isfinite(threshold) and 0 <= threshold <= 1):
        parser.error(f"--alg-p-threshold must be a number in [0, 1], got {threshold}")
    for question in args.question or ():
        if not question.strip():
            parser.error(f"--question must contain text, got {question!r}")
    if args.image is not None and not args.image.startswith(("http://", "https://")):  # a URL is fetched later
        from dimple.processing_dimple import load_images  # the processor's own checks: file, decodable, aspect ratio

        if pathlib.Path(args.image).is_dir():
            parser.error(f"--image must be a readable image file (PNG, JPEG, ...): {args.image!r} is a folder")
        try:
            return load_images([args.image])[0]
        except Exception as error:  # noqa: BLE001 (PIL raises several kinds)
            reason = str(error).removeprefix("images: ").removeprefix("images[0]: ")
            parser.error(f"--image must be a readable image file (PNG, JPEG, ...): {reason}")
    return args.image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "tiny-dimple"), help="checkpoint folder or hub id")
    parser.add_argument("--image", default=None, help="image file (default: the tiny task's sample scene)")
    parser.add_argument("--question", action="append", help="question (repeatable)")
    parser.add_argument("--use-cache", action=argparse.BooleanOptionalAction, default=None,
                        help="prefilling on / off (default: the checkpoint's setting)")
    parser.add_argument("--open-ended", action=argparse.BooleanOptionalAction, default=True,
                        help="grow the answer canvas until the end-of-text (default); --no-open-ended: a fixed canvas")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"the longest answer (open-ended, default {DEFAULT_BOUND}) or the canvas (default: the "
                             "checkpoint's), >= 1")
    parser.add_argument("--steps", type=int, default=None, help="most denoising steps, >= 1")
    parser.add_argument("--alg-p-threshold", type=float, default=None,
                        help="confident decoding threshold, in [0, 1]")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="a progress line on stderr while an answer decodes (passes done, masks left)")
    args = parser.parse_args(argv)
    image = check_args(parser, args)

    model, processor = load(args.model)
    if image is None:
        image = sample_image()
    generate_kwargs = {"show_progress": args.progress}
    if args.open_ended:
        generate_kwargs.update(open_ended_settings(getattr(model, "generation_config", None),
                                                   args.max_new_tokens or DEFAULT_BOUND))
        args.max_new_tokens = None
    for name in ("use_cache", "max_new_tokens", "steps", "alg_p_threshold"):
        if getattr(args, name) is not None:
            generate_kwargs[name] = getattr(args, name)

    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.device})")
    print(f"image: {args.image or 'generated sample scene (four shapes on a 3 x 3 grid)'}")
    for question in args.question or DEFAULT_QUESTIONS:
        text, passes, seconds = answer(model, processor, image, question, **generate_kwargs)
        print(f"Q: {question}\nA: {text}    [{passes} forward passes, {seconds * 1000:.0f} ms]")


if __name__ == "__main__":
    main()
