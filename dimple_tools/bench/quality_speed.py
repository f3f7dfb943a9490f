"""The quality-speed curve of decoding settings on the tiny model's held-out scene descriptions.

    dimple-bench quality-speed                                  # tiny-dimple/, 300 descriptions, every setting
    python -m dimple_tools.bench.quality_speed --n 600 --out benchmarks/quality_speed_tiny.json
    dimple-bench quality-speed --suite length                   # fixed canvases against open-ended decoding

Suites: `decoding` (thresholds, dual cache, early stop; reference: confident decoding at 0.9) and `length` (fixed
canvases of 32 to 256 positions against open-ended decoding bounded at 256; reference: the 48-token canvas the
tiny model was trained and is shipped with).

Every setting decodes the same held-out questions (seed 1, never used in training; descriptions, the long
answers where parallel decoding matters) one at a time, side by side in one run, on top of the checkpoint's
generation config. A row per setting: its name, the keyword arguments exactly as passed to
`diffusion_generate`, exact-match accuracy, forward passes and CPU milliseconds per answer, answer tokens per
pass, how many answers equal the reference's, and `"reference": true` on today's confident decoding at
threshold 0.9. The PNG plots accuracy against passes and against milliseconds, the reference marked.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

from dimple_tools.paths import REPOSITORY_ROOT, TINY_MODEL_DIR
from dimple_tools.tiny.build import HELD_OUT_SEED, REFERENCE_SETTING, compare_settings
from dimple_tools.tiny.task import generate_samples

DEFAULT_OUT = REPOSITORY_ROOT / "benchmarks" / "quality_speed_tiny.json"
REFERENCE = REFERENCE_SETTING  # confident decoding at 0.9, the checkpoint's
#: name -> diffusion_generate keyword arguments (on top of the checkpoint's generation config).
SETTINGS = {
    "one_token_per_pass": dict(alg_p_threshold=0.0),
    "confident_0.5": dict(alg_p_threshold=0.5),
    "confident_0.7": dict(alg_p_threshold=0.7),
    "confident_0.8": dict(alg_p_threshold=0.8),
    REFERENCE: dict(alg_p_threshold=0.9),
    "confident_0.95": dict(alg_p_threshold=0.95),
    "confident_0.99": dict(alg_p_threshold=0.99),
    "confident_0.9_dual_cache_blocks_8": dict(alg_p_threshold=0.9, block_length=8, dual_cache=True),
    "confident_0.9_stop_at_eos": dict(alg_p_threshold=0.9, stop_at_eos=True),
    # Fast-dLLM's factor rule, CreditDecoding's trace credit and the stable-draft early commit (issue 33)
    "factor_0.5": dict(alg_p_threshold=None, parallel_factor=0.5),
    "factor_1": dict(alg_p_threshold=None, parallel_factor=1.0),
    "factor_2": dict(alg_p_threshold=None, parallel_factor=2.0),
    "credit_0.9": dict(alg_p_threshold=0.9, credit_decoding=True),
    "credit_0.95": dict(alg_p_threshold=0.95, credit_decoding=True),
    "credit_factor_1": dict(alg_p_threshold=None, parallel_factor=1.0, credit_decoding=True),
    "confident_0.9_stable_1": dict(alg_p_threshold=0.9, commit_when_stable=1),
    "confident_0.95_stable_1": dict(alg_p_threshold=0.95, commit_when_stable=1),
}
#: Answer length: fixed canvases (one step per position at most) against open-ended decoding bounded at 256.
LENGTH_SETTINGS = {
    **{f"fixed_{n}": dict(max_new_tokens=n, steps=n) for n in (32, 48, 64, 128, 256)},
    "open_ended_256": dict(max_new_tokens=256, steps=256, open_ended=True),
    "open_ended_256_blocks_16": dict(max_new_tokens=256, steps=256, open_ended=True, block_length=16),
}
#: suite -> (settings, reference setting, default output)
SUITES = {
    "decoding": (SETTINGS, REFERENCE, DEFAULT_OUT),
    "length": (LENGTH_SETTINGS, "fixed_48", REPOSITORY_ROOT / "benchmarks" / "length_tiny.json"),
}


def measure(model, processor, samples: list, settings: dict, reference: str = REFERENCE) -> list:
    """One row per setting (see the module docstring), in the order of `settings`."""
    def report(name, result):
        print(f"{name:40s} accuracy {result['accuracy']:.3f}  passes {result['mean_forward_passes']:6.2f}  "
              f"ms {result['ms_per_answer']:7.1f}", flush=True)

    results = compare_settings(model, processor, samples, settings, reference, report)
    rows = []
    for name, result in results.items():
        row = {"setting": name, "kwargs": settings[name], "accuracy": result["accuracy"],
               "passes_per_answer": result["mean_forward_passes"], "ms_per_answer": result["ms_per_answer"],
               "answer_tokens_per_pass": result["answer_tokens_per_pass"], "reference": name == reference}
        if "same_answers_as_reference" in result:
            row["same_answers_as_reference"] = result["same_answers_as_reference"]
        rows.append(row)
    return rows


def markdown_table(rows: list) -> str:
    """The rows as a Markdown table (the form docs/decoding.md quotes)."""
    lines = ["| setting | accuracy | passes / answer | ms / answer | same answers as reference |",
             "|---|---|---|---|---|"]
    for row in rows:
        name = f"**{row['setting']}** (reference)" if row["reference"] else row["setting"]
        lines.append(f"| {name} | {100 * row['accuracy']:.1f} % | {row['passes_per_answer']:.2f} | "
                     f"{row['ms_per_answer']:.1f} | {row.get('same_answers_as_reference', '')} |")
    return "\n".join(lines)


def plot(rows: list, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "passes_per_answer", "forward passes per answer"),
                           (axes[1], "ms_per_answer", "CPU milliseconds per answer")):
        for row in rows:
            marker, size = ("*", 220) if row["reference"] else ("o", 40)
            ax.scatter(row[key], 100 * row["accuracy"], marker=marker, s=size, zorder=3)
            ax.annotate(row["setting"], (row[key], 100 * row["accuracy"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy (%)")
    reference = next((row["setting"] for row in rows if row["reference"]), None)
    fig.suptitle(title + (f"  (star: the reference, {reference})" if reference else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="dimple-bench quality-speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TINY_MODEL_DIR), help="checkpoint folder (default: tiny-dimple/)")
    parser.add_argument("--n", type=int, default=300, help="held-out descriptions (default 300)")
    parser.add_argument("--suite", default="decoding", choices=list(SUITES),
                        help="which settings: decoding (default) or length")
    parser.add_argument("--settings", default=None,
                        help="comma-separated names among the suite's (default: all); decoding: "
                             f"{', '.join(SETTINGS)}; length: {', '.join(LENGTH_SETTINGS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    parser.add_argument("--out", default=None, help="JSON path; the PNG is written next to it (default: "
                        "benchmarks/quality_speed_tiny.json, or benchmarks/length_tiny.json for --suite length)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be an integer >= 1, got {args.n}")
    if args.threads < 1:
        parser.error(f"--threads must be an integer >= 1, got {args.threads}")
    suite, reference, default_out = SUITES[args.suite]
    names = list(suite) if args.settings is None else [name.strip() for name in args.settings.split(",")]
    unknown = [name for name in names if name not in suite]
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose among {list(suite)}")
    from transformers import AutoModel, AutoProcessor

    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    samples = generate_samples(args.n, seed=HELD_OUT_SEED, question_type="describe")
    rows = measure(model, processor, samples, {name: suite[name] for name in names}, reference)
    print(markdown_table(rows))
    out = pathlib.Path(args.out or default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"), f"{pathlib.Path(args.model).name}: {args.n} held-out descriptions")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
