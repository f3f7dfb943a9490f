"""Document functions of the `dimple_shapes` lmms-eval task (loaded by lmms-eval from this folder)."""

import os

from PIL import Image

from dimple_tools.tiny.task import answer_is_correct

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def doc_to_visual(doc):
    with Image.open(os.path.join(DATA_DIR, doc["image"])) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    """Exact match up to case, whitespace and final punctuation (`shapes_task.answer_is_correct`)."""
    return {"exact_match": float(answer_is_correct(results[0], doc["answer"]))}
