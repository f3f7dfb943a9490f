"""Build `tiny-dimple/`: a small Dimple trained here, on the CPU, on the generated shapes-scene task.

    python -m dimple_tools.tiny.build            # writes tiny-dimple/ (+ training log, loss plot, eval)

Steps: generate training data (seed 0: scenes of 1-5 shapes on a 3 x 3 grid and their questions, see
dimple_tools/tiny/task.py) and a tokenizer trained on its text; initialise a small Dimple; pretrain its
vision tower to name what is in each grid cell (the release starts from Qwen2.5-VL's pretrained tower; ours
starts random); then `dimple-train` stage `instruct` (autoregressive, causal) and stage `diffusion`
(bidirectional, masked-diffusion loss, dual masking), each with the release's freezing; then evaluate on
held-out questions (seed 1) with `diffusion_generate`, per question type and answer length.

Every image is resized to 84 x 84 pixels: 3 x 3 merged vision tokens, one per grid cell.

The diffusion stage also keeps an early checkpoint (`--work`/diffusion/checkpoint-N, N = --early-steps): an
undertrained model for the reinforcement-learning demo.

The script deletes and rewrites its --work and --out folders only when they are missing, empty, or made by
it: those it creates carry a marker file (`.built-by-build_tiny_dimple`), and the default folders
(tiny-dimple/ as shipped, .cache/tiny-dimple-build) are recognised by the names of the files the build
writes there. Any other folder is refused (exit code 2) before anything runs.
"""

import argparse
import json
import pathlib
import shutil
import sys
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
from dimple_tools.tiny.task import COLORS, POSITIONS, SHAPES, answer_is_correct, generate_samples, write_dataset  # noqa: E402
from transformers import AutoTokenizer, GenerationConfig  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # noqa: E402

# The model's input side: 84 x 84 pixels are 6 x 6 patches of 14, merged 2 x 2 into 3 x 3 tokens (one per cell).
IMAGE_SIZE = 84
# The canvas the tiny model is evaluated and served with: the longest description (5 shapes) is 38 tokens.
CANVAS = 48
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
        "training_log.json", "loss_curves.png", "eval_results.json", "build_log.txt", "README.md", "__pycache__",
    }),
    DEFAULT_WORK.resolve(): frozenset({MARKER, "data", "tokenizer", "init", "instruct", "diffusion"}),
}
# Decoding defaults of the tiny model: greedy confident decoding over a 48-token canvas, with prefilling.
GENERATION = dict(max_new_tokens=CANVAS, steps=CANVAS, alg="maskgit_plus", alg_p_threshold=0.9,
                  decoding_pipeline="dim", use_original_confidence=True, use_cache=True)


# Sizes of the tiny model (docs/training.md says why): a vision tower that tells 13 things apart in each cell
# and a language model deep enough to turn 9 cell tokens into a description of up to 38 tokens in parallel.
MODEL_SIZES = dict(hidden_size=160, intermediate_size=448, num_hidden_layers=5, num_attention_heads=5,
                   num_key_value_heads=1)
VISION_SIZES = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4)
# M-RoPE of the tiny language model. The vision tower cannot tell where a cell is (its attention is relative
# and a blank cell looks like every other), so a cell's place reaches the language model only through its
# image token's (h, w) rotary position. M-RoPE gives t the fastest of a head's 16 frequencies, h the next and
# w the slowest; text tokens have t = h = w, so the split changes image tokens only. The release's [4, 6, 6]
# at base 1e6 turns rows by <= 0.03 rad and columns by < 0.001 rad: the grid is invisible (a first build
# answered "What is at ...?" at chance). [1, 1, 14] at base 1e4 (Llama's) turns rows by 0.56 rad and columns
# by 0.32, 0.18, 0.1 ... rad, and keeps slow frequencies that match content at any distance (a base of 4,
# all frequencies fast, trained the instruct stage to a higher loss).
MROPE_SECTION, ROPE_THETA = [1, 1, 14], 1e4


def tiny_config(ids: dict) -> DimpleConfig:
    vision = DimpleVisionConfig(
        **VISION_SIZES, out_hidden_size=MODEL_SIZES["hidden_size"], fullatt_block_indexes=[VISION_SIZES["depth"] - 1],
        window_size=112,
    )
    return DimpleConfig(
        vocab_size=ids["vocab_size"], **MODEL_SIZES, mrope_section=MROPE_SECTION, rope_theta=ROPE_THETA,
        max_position_embeddings=1024,
        vision_config=vision, full_attn_mask=False,
        **{k: v for k, v in ids.items() if k.endswith("_token_id")},
    )


CELL_CLASSES = ["empty"] + [f"{color} {shape}" for color in COLORS for shape in SHAPES]


def cell_labels(meta: dict) -> list:
    """What each of the 9 cells holds, as an index into CELL_CLASSES (reading order)."""
    labels = [0] * len(POSITIONS)
    for shape in meta["shapes"]:
        labels[shape["cell"]] = CELL_CLASSES.index(f"{shape['color']} {shape['shape']}")
    return labels


def pretrain_vision(model, processor, n_samples: int, steps: int, batch_size: int = 64, lr: float = 2e-3) -> list:
    """Train the vision tower (with throw-away linear heads on each merged token) to name what each grid cell
    holds (empty or one of the 12 colour-shape pairs) and which cell it is; an 84 x 84 image's 3 x 3 merged
    tokens are its 9 cells. This stands in for the pretrained Qwen2.5-VL tower the release starts from, whose
    features say where they are (it is trained on grounding): without the cell target an empty cell's feature
    is the same everywhere, and the language model, which sees a cell's place only through rotary angles that
    are relative, did not learn to look a named cell up ("What is at the top?" at chance). Returns the losses."""
    samples = generate_samples(n_samples, seed=0)  # the training images' scenes (the same seed)
    pixels = processor(images=[s[0] for s in samples], return_tensors="pt")
    tokens = len(POSITIONS)
    patches = pixels["pixel_values"].view(n_samples, -1, pixels["pixel_values"].shape[-1])
    grid = pixels["image_grid_thw"]
    if not (grid == torch.tensor([1, 6, 6])).all():
        raise RuntimeError(f"expected every image as 6 x 6 patches (84 x 84 pixels), got {grid.unique(dim=0).tolist()}")
    labels = torch.tensor([cell_labels(s[3]) for s in samples])
    width = model.config.vision_config.out_hidden_size
    head = torch.nn.Linear(width, len(CELL_CLASSES))
    cell_head = torch.nn.Linear(width, tokens)
    cells = torch.arange(tokens).expand(batch_size, tokens)
    optimizer = torch.optim.AdamW([*model.visual.parameters(), *head.parameters(), *cell_head.parameters()], lr=lr,
                                  weight_decay=0.0)
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
        features = model.visual(patches[index].flatten(0, 1), grid[index]).view(batch_size, tokens, width)
        logits, cell_logits = head(features), cell_head(features)
        loss = F.cross_entropy(logits.flatten(0, 1), labels[index].flatten())
        loss = loss + F.cross_entropy(cell_logits.flatten(0, 1), cells.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step % 10 == 0:
            accuracy = (logits.argmax(-1) == labels[index]).float().mean().item()
            where = (cell_logits.argmax(-1) == cells).float().mean().item()
            history.append({"step": step, "loss": loss.item(), "cell_accuracy": accuracy, "where_accuracy": where})
        if step % 100 == 0:
            print(f"vision pretraining step {step}/{steps}: loss {loss.item():.3f}, content {accuracy:.3f}, "
                  f"cell {where:.3f}", flush=True)
    return history


def build_processor(tokenizer_dir: pathlib.Path) -> DimpleProcessor:
    image_processor = Qwen2VLImageProcessor(min_pixels=IMAGE_SIZE**2, max_pixels=IMAGE_SIZE**2)  # 84 x 84
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


# Answer-length buckets (tokens) of the evaluation: short answers, phrases, descriptions of 1-2 and 3-5 shapes.
LENGTH_BUCKETS = ((1, 4), (5, 16), (17, 32), (33, CANVAS))


def length_bucket(tokens: int) -> str:
    low, high = next(b for b in LENGTH_BUCKETS if b[0] <= tokens <= b[1] or b == LENGTH_BUCKETS[-1])
    return f"{low}-{high}"


def summarise(records: list) -> dict:
    n = len(records)
    return {
        "n": n,
        "accuracy": sum(r["correct"] for r in records) / n,
        "mean_forward_passes": sum(r["passes"] for r in records) / n,
        "answer_tokens_per_pass": sum(r["tokens"] for r in records) / max(1, sum(r["passes"] for r in records)),
    }


def evaluate(model, processor, samples: list, **generate_kwargs) -> dict:
    """Exact-answer accuracy and forward passes per answer on `samples`, overall, per question type and per
    answer-length bucket (the expected answer's tokens); answer tokens per pass counts the expected answer's
    tokens over the passes of its decode."""
    records, start = [], time.perf_counter()
    for image, question, expected, meta in samples:
        answer, passes = ask(model, processor, image, question, **generate_kwargs)
        tokens = len(processor.tokenizer(expected, add_special_tokens=False)["input_ids"])
        records.append({"type": meta["question_type"], "tokens": tokens, "passes": passes, "answer": answer,
                        "correct": answer_is_correct(answer, expected)})
    seconds = time.perf_counter() - start
    result = summarise(records)
    result["ms_per_answer"] = round(1000 * seconds / len(records), 2)
    result["by_question_type"] = {kind: summarise([r for r in records if r["type"] == kind])
                                  for kind in sorted({r["type"] for r in records})}
    result["by_answer_tokens"] = {bucket: summarise([r for r in records if length_bucket(r["tokens"]) == bucket])
                                  for bucket in sorted({length_bucket(r["tokens"]) for r in records},
                                                       key=lambda b: int(b.split("-")[0]))}
    result["generate_kwargs"] = generate_kwargs
    result["answers"] = [r["answer"] for r in records]
    return result


# Decoding settings evaluated on the held-out questions (eval_results.json), on top of the checkpoint's
# generation config (greedy maskgit_plus, confident decoding at 0.9, prefilling, a 48-token canvas): one token
# per pass (the baseline of parallel decoding), confident decoding at 0.9 and 0.95, Fast-dLLM's block-wise dual
# cache, and stopping at the end-of-text.
EVAL_SETTINGS = {
    "one_token_per_pass": dict(alg_p_threshold=0.0),
    "confident_0.9": dict(),
    "confident_0.95": dict(alg_p_threshold=0.95),
    "dual_cache_blocks_8": dict(block_length=8, dual_cache=True),
    "stop_at_eos": dict(stop_at_eos=True),
}
REFERENCE_SETTING = "confident_0.9"
HELD_OUT_SEED = 1


def compare_settings(model, processor, samples: list, settings: dict, reference: str, report=None) -> dict:
    """`evaluate` of every setting (name -> generate kwargs) on the same samples, side by side, each with how
    many answers equal those of the `reference` setting (when it is among them); `report(name, result)` is
    called after each setting."""
    results = {}
    for name, kwargs in settings.items():
        results[name] = evaluate(model, processor, samples, **kwargs)
        if report is not None:
            report(name, results[name])
    reference_answers = results[reference]["answers"] if reference in results else None
    for result in results.values():
        answers = result.pop("answers")
        if reference_answers is not None:
            result["same_answers_as_reference"] = sum(a == b for a, b in zip(answers, reference_answers))
    return results


def evaluate_settings(model, processor, n: int) -> dict:
    """Every setting of EVAL_SETTINGS on the same n held-out questions (seed 1), with how many answers equal
    those of the reference setting (confident decoding at 0.9)."""
    samples = generate_samples(n, seed=HELD_OUT_SEED)
    results = compare_settings(model, processor, samples, EVAL_SETTINGS, REFERENCE_SETTING)
    return {"held_out": {"seed": HELD_OUT_SEED, "n": n, "reference": REFERENCE_SETTING,
                         "decoding_defaults": GENERATION}, "settings": results}


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


def run_stage(stage: str, model_dir, data: pathlib.Path, out: pathlib.Path, steps: int, lr: float, batch_size: int,
              extra=()):
    argv = [
        "--model_name_or_path", str(model_dir), "--data_path", str(data), "--stage", stage,
        "--output_dir", str(out), "--max_steps", str(steps), "--learning_rate", str(lr),
        "--per_device_train_batch_size", str(batch_size), "--lr_scheduler_type", "cosine", "--warmup_steps", "50",
        "--weight_decay", "0.0", "--logging_steps", "10", "--report_to", "none",
        "--seed", "0", "--dataloader_num_workers", "0", "--use_cpu", "true", "--max_grad_norm", "1.0",
        "--answer_padding_to", str(CANVAS), *extra,
    ]
    if "--save_strategy" not in extra:
        argv += ["--save_strategy", "no"]
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
              ("--eval-samples", args.eval_samples), ("--batch-size", args.batch_size))
    for flag, value in counts:
        if value < 1:
            parser.error(f"{flag} must be an integer >= 1, got {value}")
    if not 1 <= args.early_steps < args.diffusion_steps:
        parser.error(f"--early-steps must be from 1 to --diffusion-steps - 1 ({args.diffusion_steps - 1}), "
                     f"got {args.early_steps}")
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
    parser.add_argument("--train-samples", type=int, default=12000, help=">= 1")
    parser.add_argument("--vision-steps", type=int, default=1000, help=">= 1")
    parser.add_argument("--ar-steps", type=int, default=600, help=">= 1")
    parser.add_argument("--diffusion-steps", type=int, default=2600, help=">= 1")
    parser.add_argument("--early-steps", type=int, default=400,
                        help="the diffusion step of the undertrained checkpoint kept in --work (RL's start)")
    parser.add_argument("--batch-size", type=int, default=32, help="per step of both language stages, >= 1")
    parser.add_argument("--eval-samples", type=int, default=600, help="held-out questions per setting, >= 1")
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

    data = write_dataset(work / "data", n=args.train_samples, seed=0)
    ids = build_tiny_tokenizer(work / "tokenizer")
    processor = build_processor(work / "tokenizer")
    model = DimpleModel(tiny_config(ids))
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
        mask_token_id=ids["mask_token_id"], **GENERATION,
    )
    n_params = sum(p.numel() for p in model.parameters())
    histories = {"vision": pretrain_vision(model, processor, min(args.train_samples, 6000), args.vision_steps)}
    phases = {"data_and_vision": round(time.perf_counter() - start, 1)}
    save_checkpoint(model, processor, str(work / "init"))
    histories["instruct"] = run_stage("instruct", work / "init", data, work / "instruct", args.ar_steps, 2e-3,
                                      args.batch_size)
    phases["instruct"] = round(time.perf_counter() - start - sum(phases.values()), 1)
    histories["diffusion"] = run_stage(
        "diffusion", work / "instruct", data, work / "diffusion", args.diffusion_steps, 1e-3, args.batch_size,
        extra=("--masking", "dual", "--save_strategy", "steps", "--save_steps", str(args.early_steps),
               "--save_only_model", "true"),
    )
    for checkpoint in (work / "diffusion").glob("checkpoint-*"):  # keep only the undertrained one
        if checkpoint.name != f"checkpoint-{args.early_steps}":
            shutil.rmtree(checkpoint)
    train_seconds = time.perf_counter() - start
    phases["diffusion"] = round(train_seconds - sum(phases.values()), 1)

    # Checked at the start too; this catches a change since then.
    card = out / "README.md"  # the model card is written by hand: kept across rebuilds
    card_text = card.read_text() if card.is_file() else None
    remove_folder(parser, "--out", out, note=f" (the trained model is in {work / 'diffusion'})")
    shutil.copytree(work / "diffusion", out, ignore=shutil.ignore_patterns("checkpoint-*", "training_args.bin", "README.md"))
    make_folder(out)
    if card_text is not None:
        card.write_text(card_text)
    (out / "training_log.json").write_text(json.dumps(histories, indent=1) + "\n")
    plot_losses(histories, out / "loss_curves.png")

    model = DimpleModel.from_pretrained(out).eval()
    processor = DimpleProcessor.from_pretrained(out, trust_remote_code=True)
    results = {"parameters": n_params, "train_seconds": round(train_seconds, 1), "phase_seconds": phases,
               "build_command": "python -m dimple_tools.tiny.build " + " ".join(argv if argv is not None else sys.argv[1:])}
    results.update(evaluate_settings(model, processor, args.eval_samples))
    (out / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
