"""Build the local lmms-eval task `dimple_shapes`: generated shape-scene questions for the tiny Dimple.

    python -m dimple_tools.evaluation.shapes --out .cache/lmms-eval-tasks [--n 120 --seed 1]
    lmms-eval --model dimple --model_args pretrained=tiny-dimple --include_path .cache/lmms-eval-tasks \\
        --tasks dimple_shapes

Writes OUT/dimple_shapes/: the task YAML and its document functions (copied from
dimple_tools/evaluation/tasks/dimple_shapes/) and the data, `data/test.jsonl` (one question per line: id, image,
question, answer, question_type) and `data/images/NNNNNN.png`. The questions are the tiny task's held-out ones
(seed 1; the tiny model trains on seed 0): scene descriptions, counts, positions, colours and shapes. lmms-eval reads the JSON through
`datasets`' json builder: nothing is downloaded.
"""

import argparse
import json
import os
import pathlib
import shutil

from dimple_tools.tiny.task import DEFAULT_IMAGE_SIZE, generate_samples

TASK_NAME = "dimple_shapes"
TEMPLATE_DIR = pathlib.Path(__file__).resolve().parent / "tasks" / TASK_NAME
DEFAULT_N = 200
DEFAULT_SEED = 1


def write_task(out: str, n: int = DEFAULT_N, seed: int = DEFAULT_SEED, image_size: int = DEFAULT_IMAGE_SIZE) -> pathlib.Path:
    """Write the task folder OUT/dimple_shapes (replacing one written before); returns its JSONL path."""
    task_dir = pathlib.Path(out) / TASK_NAME
    data_dir = task_dir / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    (data_dir / "images").mkdir(parents=True)
    for name in ("dimple_shapes.yaml", "utils.py"):
        shutil.copyfile(TEMPLATE_DIR / name, task_dir / name)
    jsonl = data_dir / "test.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for image, question, answer, meta in generate_samples(n, seed, image_size):
            path = f"images/{meta['index']:06d}.png"
            image.save(data_dir / path)
            row = {"id": meta["id"], "image": path, "question": question, "answer": answer,
                   "question_type": meta["question_type"]}
            f.write(json.dumps(row) + "\n")
    return jsonl


def read_task(out: str) -> list[dict]:
    """The rows of OUT/dimple_shapes/data/test.jsonl, in order."""
    with open(os.path.join(out, TASK_NAME, "data", "test.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for --include_path (the task is OUT/dimple_shapes)")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"questions (default {DEFAULT_N})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the questions (default {DEFAULT_SEED})")
    args = parser.parse_args(argv)
    if args.n < 1 or args.seed < 0:
        parser.error("--n must be >= 1 and --seed >= 0")
    path = write_task(args.out, args.n, args.seed)
    print(f"wrote {args.n} questions to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
