"""lmms-eval's entry point for Dimple: `lmms-eval --model dimple ...` with an unmodified lmms-eval (0.7.x).

pyproject.toml registers `manifest` in the entry-point group `lmms_eval.models`; lmms-eval's model registry
(`lmms_eval.models.registry_v2`) loads every entry point of that group when it starts and calls a callable
payload for its `ModelManifest`. This module stays light (nothing but the manifest is imported when lmms-eval
starts, whatever model it runs); the model class is `dimple_tools.evaluation.model.Dimple`, imported only when
`--model dimple` is asked for.
"""

MODEL_ID = "dimple"
CLASS_PATH = "dimple_tools.evaluation.model.Dimple"


def manifest():
    """The `ModelManifest` of `--model dimple` (a "simple" lmms-eval model: text prompt + images)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
