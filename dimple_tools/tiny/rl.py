"""`make rl-tiny`: GRPO (`dimple-train --stage grpo`) on the undertrained tiny model, measured before and after.

    python -m dimple_tools.tiny.rl            # build/rl-tiny/{start,final}, benchmarks/rl_tiny.{json,png}

The start is the tiny build's early diffusion checkpoint (`.cache/tiny-dimple-build/diffusion/checkpoint-N`, kept
by `python -m dimple_tools.tiny.build`, N = its --early-steps), whose scene descriptions are about half right.
RL prompts are description questions of a training seed (2; the held-out seed 1 is never trained on), the reward
is partial credit per shape (`shapes_partial_credit`). Held-out description accuracy is measured on the same
questions with the same decoding (the tiny model's defaults: greedy confident decoding at 0.9, 48-token canvas)
before and after.
"""

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

import torch

from dimple_tools.paths import REPOSITORY_ROOT
from dimple_tools.tiny import build
from dimple_tools.tiny.task import generate_samples, to_record

DEFAULT_START = build.DEFAULT_WORK / "diffusion"
DEFAULT_OUT = REPOSITORY_ROOT / "build" / "rl-tiny"
DEFAULT_REPORT = REPOSITORY_ROOT / "benchmarks" / "rl_tiny.json"
RL_SEED = 2
# The GRPO run (about 10 minutes on two CPU cores): 8 prompts x 8 completions per step, the checkpoint's decoding
# (confident at 0.9) sampled at temperature 1, each token scored in the context the sampling decoded it in
# (completion_masking=trajectory; the one-pass estimator over the masked canvas lowered held-out accuracy).
GRPO_ARGS = dict(max_steps=100, per_device_train_batch_size=64, num_generations=8, learning_rate=1e-4,
                 lr_scheduler_type="constant_with_warmup", warmup_steps=10, temperature=1.0, beta=0.0,
                 completion_masking="trajectory", p_mask_prompt=0.0, max_completion_length=build.CANVAS,
                 save_steps=50, logging_steps=5, seed=0, bf16="false", gradient_checkpointing="false")


def early_checkpoint(work: pathlib.Path) -> pathlib.Path:
    """The one checkpoint-N folder the tiny build kept in `work`."""
    found = sorted(work.glob("checkpoint-*"))
    if len(found) != 1:
        raise SystemExit(
            f"rl-tiny starts from the tiny build's undertrained checkpoint, {work}/checkpoint-N, and found "
            f"{len(found) or 'none'}: run `make tiny-dimple` (python -m dimple_tools.tiny.build, about 30 minutes), "
            f"which keeps it, or pass --start FOLDER")
    return found[0]


def write_prompts(folder: pathlib.Path, n: int) -> pathlib.Path:
    """n description questions of the training seed RL_SEED as a dimple-train data file."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / "data.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for image, question, answer, meta in generate_samples(n, seed=RL_SEED, question_type="describe"):
            relative = f"images/{meta['index']:06d}.png"
            image.save(folder / relative)
            handle.write(json.dumps(to_record(question, answer, meta, relative)) + "\n")
    return path


def held_out_accuracy(folder: pathlib.Path, n: int) -> dict:
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    samples = generate_samples(n, seed=build.HELD_OUT_SEED, question_type="describe")
    result = build.evaluate(model, processor, samples, **build.GENERATION)
    return {key: result[key] for key in ("n", "accuracy", "mean_forward_passes", "answer_tokens_per_pass",
                                         "ms_per_answer")}


def grpo_argv(start: pathlib.Path, data: pathlib.Path, out: pathlib.Path, settings: dict) -> list:
    argv = ["--stage", "grpo", "--model_name_or_path", str(start), "--data_path", str(data), "--output_dir", str(out),
            "--reward_funcs", "shapes_partial_credit", "--report_to", "none", "--use_cpu", "true",
            "--save_strategy", "steps", "--save_only_model", "false", "--dataloader_num_workers", "0"]
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    return argv


def plot(history: list, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(h["step"], h["reward"]) for h in history if "reward" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], marker=".")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward (partial credit)")
    ax.set_title("tiny Dimple: GRPO on scene descriptions")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=pathlib.Path, default=None,
                        help=f"the checkpoint RL starts from (default: the one kept in {DEFAULT_START})")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="start/, data/, run/ and final/")
    parser.add_argument("--report", type=pathlib.Path, default=DEFAULT_REPORT, help="JSON report (a PNG beside it)")
    parser.add_argument("--prompts", type=int, default=4000, help="RL prompts (description questions of seed 2)")
    parser.add_argument("--eval-samples", type=int, default=600, help="held-out descriptions (seed 1)")
    parser.add_argument("--max-steps", type=int, default=GRPO_ARGS["max_steps"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grpo", action="append", default=[], metavar="FLAG=VALUE",
                        help="override a dimple-train --stage grpo flag of the run, e.g. --grpo learning_rate=1e-4")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start_source = args.start or early_checkpoint(DEFAULT_START)
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    start = out / "start"
    # a complete AutoModel folder (weights, processor, remote code), without the Trainer's pickled files
    shutil.copytree(start_source, start, ignore=shutil.ignore_patterns("training_args.bin", "*.pt", "*.pth",
                                                                       "trainer_state.json"))
    data = write_prompts(out / "data", args.prompts)
    before = held_out_accuracy(start, args.eval_samples)
    print(f"start {start_source}: held-out descriptions {before['accuracy']:.1%}", flush=True)

    from dimple_tools.training import train as dimple_train

    settings = {**GRPO_ARGS, "max_steps": args.max_steps}
    for override in args.grpo:
        key, sep, value = override.partition("=")
        if not sep or not key:
            parser.error(f"--grpo {override}: expected FLAG=VALUE")
        settings[key.lstrip("-")] = value
    began = time.perf_counter()
    dimple_train.main(grpo_argv(start, data, out / "final", settings))
    seconds = time.perf_counter() - began
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    after = held_out_accuracy(out / "final", args.eval_samples)
    print(f"final: held-out descriptions {after['accuracy']:.1%} after {seconds / 60:.1f} min of GRPO", flush=True)
    history = [h for h in state["log_history"] if "reward" in h]
    report = {
        "start_checkpoint": os.path.relpath(start_source, REPOSITORY_ROOT),
        "command": "python -m dimple_tools.tiny.rl " + " ".join(sys.argv[1:] if argv is None else argv),
        "grpo_command": "dimple-train " + " ".join(grpo_argv(pathlib.Path("build/rl-tiny/start"),
                                                             pathlib.Path("build/rl-tiny/data/data.jsonl"),
                                                             pathlib.Path("build/rl-tiny/final"), settings)),
        "grpo_seconds": round(seconds, 1),
        "held_out": {"seed": build.HELD_OUT_SEED, "question_type": "describe", "decoding": build.GENERATION,
                     "before": before, "after": after,
                     "gain_points": round(100 * (after["accuracy"] - before["accuracy"]), 1)},
        "reward_curve": [{"step": h["step"], "reward": h["reward"], "reward_std": h.get("reward_std")}
                         for h in history],
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    plot(history, args.report.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("grpo_seconds", "held_out")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
