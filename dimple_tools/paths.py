"""Where the repository's files are, for tools that default to them (the tiny model, the 7B config, assets).

`dimple_tools` is installed editable from the repository (`pip install -e .`), so the repository root is the
folder above this package.
"""

import pathlib

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_MODEL_DIR = REPOSITORY_ROOT / "tiny-dimple"
