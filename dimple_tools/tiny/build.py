"""Build `tiny-dimple/`: a small Dimple trained here, on the CPU, on the generated shapes task.

    python -m dimple_tools.tiny.build            # writes tiny-dimple/ (+ training log, loss plot, eval)

Steps: generate training data (seed 0) and a tokenizer trained on its text; initialise a small Dimple;
pretrain its vision tower to classify colour and shape (the release starts from Qwen2.5-VL's pretrained
tower; ours starts random); then `dimple-train` stage `instruct` (autoregressive, causal) and stage
`diffusion` (bidirectional, masked-diffusion loss, dual masking), each with the release's freezing; then
evaluate on held-out images (seed 1) with `diffusion_generate`.

The script deletes and rewrites its --work and --out folders only when they are missing, empty, or made by
it: those it creates carry a marker file (`.built-by-build_tiny_dimple`), and the default folders
(tiny-dimple/ as shipped, .cache/tiny-dimple-build) are recognised by the names of the files the build
writes there. Any other folder is refused (exit code 2) before anything runs.
"""

import argparse
import json
import pathlib
import shutil
import time

import torch
import torch.nn.functional as F

from dimple_tools.paths import REPOSITORY_ROOT  # noqa: E402
ROOT = REPOSITORY_ROOT

from dimple_tools.training import train as train_dimple  # noqa: E402
from dimple_tools.training.checkpoints import save_checkpoint  # noqa: E402
from dimple_tools.tiny.tokenizer import build_tiny_tokenizer  # noqa: E402
from dimple.configuration_dimple import DimpleConfig, DimpleVisionConfig  # noqa: E402
from dimple.modeling_dimple import DimpleModel  # noqa: E402
from dimple.processing_dimple import DimpleProcessor  # noqa: E402
from dimple_tools.tiny.task import COLORS, SHAPES, answer_is_correct, generate_samples, write_dataset  # noqa: E402
from transformers import AutoTokenizer, GenerationConfig  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # noqa: E402

IMAGE_SIZE = 56
# Written into the --work and --out folders this script creates: it may delete and rewrite only those
# (besides empty folders and the default folders below).
MARKER = ".built-by-build_tiny_dimple"
DEFAULT_OUT = ROOT / "tiny-dimple"
DEFAULT_WORK = ROOT / ".cache" / "tiny-dimple-build"
# What the build writes into its default folders (tiny-dimple/ is shipped without the marker). A default
# folder holding only these names is the script's own; anything else in it, and it is refused.
BUILT_ENTRIES = {
    DEFAULT_OUT.resolve(): frozenset({
        MARKER, "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
        "chat_template.json", "preprocessor_config.json", "processor_config.json", "configuration_dimple.py",
        "modeling_dimple.py", "generation_utils.py", "processing_dimple.py", "trainer_state.json",
        "training_log.json", "loss_curves.png", "eval_results.json", "build_log.txt", "__pycache__",
    }),
    DEFAULT_WORK.resolve(): frozenset({MARKER, "data", "tokenizer", "init", "instruct", "diffusion"}),
}
# Decoding defaults of the tiny model: greedy confident decoding over an 8-token canvas.
GENERATION = dict(max_new_tokens=8, steps=8, alg="maskgit_plus", alg_p_threshold=0.9,
                  decoding_pipeline="dim", use_original_confidence=True, use_cache=False)


def tiny_config(ids: dict) -> DimpleConfig:
    vision = DimpleVisionConfig(
        depth=3, hidden_size=96, intermediate_size=192, num_heads=4, out_hidden_size=128,
        fullatt_block_indexes=[2], window_size=112,
    )
    return DimpleConfig(
        vocab_size=ids["vocab_size"], hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 6, 6], max_position_embeddings=1024,
        vision_config=vision, full_attn_mask=False,
        **{k: v for k, v in ids.items() if k.endswith("_token_id")},
    )


def pretrain_vision(model, processor, n_samples: int, steps: int, batch_size: int = 64, lr: float = 2e-3) -> list:
    """Train the vision tower (with a throw-away linear head on its mean feature) to classify colour and
    shape. This stands in for the pretrained Qwen2.5-VL tower the release starts from; returns the losses."""
    samples = generate_samples(n_samples, seed=0, image_size=IMAGE_SIZE)
    pixels = processor.image_processor(images=[s[0] for s in samples], return_tensors="pt")
    patches = pixels["pixel_values"].view(n_samples, -1, pixels["pixel_values"].shape[-1])
    grid = pixels["image_grid_thw"]
    colors, shapes = list(COLORS), list(SHAPES)
    color_labels = torch.tensor([colors.index(s[3]["color"]) for s in samples])
    shape_labels = torch.tensor([shapes.index(s[3]["shape"]) for s in samples])
    width = model.config.vision_config.out_hidden_size
    head = torch.nn.Linear(width, len(colors) + len(shapes))
    optimizer = torch.optim.AdamW([*model.visual.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    # Constant, then a linear decay over the last 30%: a from-scratch ViT learns shapes late and needs the
    # high rate to get there, and the decay settles it.
    decay_from = int(0.7 * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 if step < decay_from else (steps - step) / (steps - decay_from)
    )
    generator = torch.Generator().manual_seed(0)
    history = []
    model.train()
    for step in range(steps):
        index = torch.randint(n_samples, (batch_size,), generator=generator)
        features = model.visual(patches[index].flatten(0, 1), grid[index]).view(batch_size, -1, width).mean(1)
        logits = head(features)
        loss = F.cross_entropy(logits[:, : len(colors)], color_labels[index]) + F.cross_entropy(
            logits[:, len(colors) :], shape_labels[index]
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step % 10 == 0:
            history.append({"step": step, "loss": loss.item()})
        if step % 100 == 0:
            print(f"vision pretraining step {step}/{steps}: loss {loss.item():.3f}", flush=True)
    return history


def build_processor(tokenizer_dir: pathlib.Path) -> DimpleProcessor:
    image_processor = Qwen2VLImageProcessor(min_pixels=IMAGE_SIZE**2, max_pixels=IMAGE_SIZE**2)
    return DimpleProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir))


def ask(model, processor, image, question: str, **generate_kwargs):
    """One question about one image -> (answer, forward passes)."""
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    out = model.diffusion_generate(**inputs, return_dict_in_generate=True, **generate_kwargs)
    answer = processor.decode_answers(out.sequences[0], prompt_length=inputs["input_ids"].shape[1])
    return answer, out.num_forward_passes


def evaluate(model, processor, n: int, seed: int, **generate_kwargs) -> dict:
    """Exact-answer accuracy on freshly generated images, and forward passes per answer by answer length."""
    correct, passes_by_length, answers, start = 0, {}, [], time.perf_counter()
    for image, question, expected, _ in generate_samples(n, seed=seed, image_size=IMAGE_SIZE):
        answer, passes = ask(model, processor, image, question, **generate_kwargs)
        answers.append(answer)
        correct += answer_is_correct(answer, expected)
        length = len(processor.tokenizer(expected, add_special_tokens=False)["input_ids"])
        passes_by_length.setdefault(length, []).append(passes)
    all_passes = [p for v in passes_by_length.values() for p in v]
    return {
        "n": n, "seed": seed, "accuracy": correct / n,
        "mean_forward_passes": sum(all_passes) / n,
        "forward_passes_by_answer_tokens": {k: sum(v) / len(v) for k, v in sorted(passes_by_length.items())},
        "seconds": round(time.perf_counter() - start, 2),
        "generate_kwargs": generate_kwargs,
        "answers": answers,
    }


# Decoding settings evaluated on the held-out questions (eval_results.json): the release's decoding with and
# without prefilling, then our options (stop_at_eos, block-wise decoding, Fast-dLLM's dual cache).
EVAL_SETTINGS = {
    "eval_prefill_off": dict(use_cache=False),
    "eval_prefill_on": dict(use_cache=True),
    "eval_stop_at_eos": dict(use_cache=False, stop_at_eos=True),
    "eval_blocks_4": dict(block_length=4),
    "eval_dual_cache_blocks_4": dict(block_length=4, dual_cache=True),
    "eval_dual_cache_prefill_blocks_4": dict(block_length=4, dual_cache=True, use_cache=True),
    "eval_dual_cache_blocks_2": dict(block_length=2, dual_cache=True),
    "eval_dual_cache_blocks_4_stop_at_eos": dict(block_length=4, dual_cache=True, stop_at_eos=True),
}


def evaluate_settings(model, processor, n: int) -> dict:
    """Every setting of EVAL_SETTINGS on the same n held-out questions (seed 1), with how many answers equal
    those of the reference decoding (prefilling off)."""
    results = {name: evaluate(model, processor, n, seed=1, **kwargs) for name, kwargs in EVAL_SETTINGS.items()}
    reference = results["eval_prefill_off"]["answers"]
    for result in results.values():
        answers = result.pop("answers")
        result["same_answers_as_prefill_off"] = sum(a == b for a, b in zip(answers, reference))
    return results


def plot_losses(histories: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.5))
    for ax, (stage, history) in zip(axes, histories.items()):
        points = [(h["step"], h["loss"]) for h in history if "loss" in h]
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_stage(stage: str, model_dir, data: pathlib.Path, out: pathlib.Path, steps: int, lr: float, extra=()):
    argv = [
        "--model_name_or_path", str(model_dir), "--data_path", str(data), "--stage", stage,
        "--output_dir", str(out), "--max_steps", str(steps), "--learning_rate", str(lr),
        "--per_device_train_batch_size", "16", "--lr_scheduler_type", "cosine", "--warmup_steps", "50",
        "--weight_decay", "0.0", "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none",
        "--seed", "0", "--dataloader_num_workers", "0", "--use_cpu", "true", "--max_grad_norm", "1.0",
        *extra,
    ]
    train_dimple.main(argv)
    state = json.loads((out / "trainer_state.json").read_text())
    return state["log_history"]


def refusal(path: pathlib.Path):
    """Why the folder `path` must not be deleted, or None when it may be: it is missing, empty, carries
    the marker, or is a default folder holding only what the build writes there."""
    if not path.exists():
        return None
    if not path.is_dir():
        return "is not a folder"
    names = {entry.name for entry in path.iterdir()}
    if not names or MARKER in names:
        return None
    known = BUILT_ENTRIES.get(path.resolve())
    if known is not None:
        if names <= known:
            return None
        extra = sorted(names - known)
        return f"is not empty and was not made by this script (it holds {extra}, which the build does not write)"
    return f"is not empty and was not made by this script (no {MARKER} file in it)"


def check_folder(parser, flag: str, path: pathlib.Path, note: str = "") -> None:
    """Stop with `parser.error` naming the flag unless the script may delete `path` (see `refusal`)."""
    reason = refusal(path)
    if reason is not None:
        parser.error(f"{flag} {str(path)!r} {reason}; give a new or empty folder, or remove it yourself{note}")


def remove_folder(parser, flag: str, path: pathlib.Path, note: str = "") -> None:
    check_folder(parser, flag, path, note)
    if path.exists():
        shutil.rmtree(path)


def make_folder(path: pathlib.Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("Made by dimple_tools/tiny/build.py, which deletes and rewrites this folder.\n")


def check_args(parser, args) -> None:
    """Every argument, before anything is deleted or run (exit code 2 on a bad one)."""
    counts = (("--train-samples", args.train_samples), ("--vision-steps", args.vision_steps),
              ("--ar-steps", args.ar_steps), ("--diffusion-steps", args.diffusion_steps),
              ("--eval-samples", args.eval_samples))
    for flag, value in counts:
        if value < 1:
            parser.error(f"{flag} must be an integer >= 1, got {value}")
    out = pathlib.Path(args.out)
    if args.evaluate_only:
        if not (out / "eval_results.json").is_file() or not (out / "config.json").is_file():
            parser.error(f"--out {args.out!r} is not a built folder (no config.json / eval_results.json); "
                         "--evaluate-only re-evaluates a folder this script built")
        return
    work = pathlib.Path(args.work)
    a, b = work.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        parser.error(f"--work {args.work!r} and --out {args.out!r} must be separate folders (neither inside the other)")
    check_folder(parser, "--work", work)
    check_folder(parser, "--out", out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="the built model (replaced: must be new, empty, or made by this script)")
    parser.add_argument("--work", default=str(DEFAULT_WORK),
                        help="data and stage checkpoints (replaced: must be new, empty, or made by this script)")
    parser.add_argument("--train-samples", type=int, default=3000, help=">= 1")
    parser.add_argument("--vision-steps", type=int, default=2000, help=">= 1")
    parser.add_argument("--ar-steps", type=int, default=400, help=">= 1")
    parser.add_argument("--diffusion-steps", type=int, default=500, help=">= 1")
    parser.add_argument("--eval-samples", type=int, default=300, help=">= 1")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="re-run the held-out evaluation of the built folder (--out) and update eval_results.json")
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.evaluate_only:
        out = pathlib.Path(args.out)
        results = json.loads((out / "eval_results.json").read_text())
        model = DimpleModel.from_pretrained(out).eval()
        processor = DimpleProcessor.from_pretrained(out, trust_remote_code=True)
        results.update(evaluate_settings(model, processor, args.eval_samples))
        (out / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps(results, indent=1))
        return
    torch.manual_seed(0)
    work, out = pathlib.Path(args.work), pathlib.Path(args.out)
    remove_folder(parser, "--work", work)
    make_folder(work)
    start = time.perf_counter()

    data = write_dataset(work / "data", n=args.train_samples, seed=0, image_size=IMAGE_SIZE)
    ids = build_tiny_tokenizer(work / "tokenizer")
    processor = build_processor(work / "tokenizer")
    model = DimpleModel(tiny_config(ids))
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
        mask_token_id=ids["mask_token_id"], **GENERATION,
    )
    n_params = sum(p.numel() for p in model.parameters())
    histories = {"vision": pretrain_vision(model, processor, args.train_samples, args.vision_steps)}
    save_checkpoint(model, processor, str(work / "init"))
    histories["instruct"] = run_stage("instruct", work / "init", data, work / "instruct", args.ar_steps, 2e-3)
    histories["diffusion"] = run_stage(
        "diffusion", work / "instruct", data, work / "diffusion", args.diffusion_steps, 1e-3,
        extra=("--masking", "dual"),
    )
    train_seconds = time.perf_counter() - start

    # Checked at the start too; this catches a change since then.
    remove_folder(parser, "--out", out, note=f" (the trained model is in {work / 'diffusion'})")
    shutil.copytree(work / "diffusion", out, ignore=shutil.ignore_patterns("checkpoint-*", "training_args.bin", "README.md"))
    make_folder(out)
    (out / "training_log.json").write_text(json.dumps(histories, indent=1) + "\n")
    plot_losses(histories, out / "loss_curves.png")

    model = DimpleModel.from_pretrained(out).eval()
    processor = DimpleProcessor.from_pretrained(out, trust_remote_code=True)
    results = {"parameters": n_params, "train_seconds": round(train_seconds, 1)}
    results.update(evaluate_settings(model, processor, args.eval_samples))
    (out / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
