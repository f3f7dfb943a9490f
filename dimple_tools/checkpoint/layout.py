"""Check that the repository's model has the released Dimple-7B checkpoint's state-dict layout.

    python -m dimple_tools.checkpoint.layout [--reference tests/data/dimple7b_state_dict.json]

Builds the model for the repository's config.json on the meta device (no memory, no weights) through
`AutoModel` with `trust_remote_code`, as users load it, and prints every parameter whose name or shape
differs from the reference (the release's names and shapes). Exit status 0 when they match exactly.
"""

import argparse
import json
import pathlib
import sys

import torch
from transformers import AutoConfig, AutoModel

# Imported here, not first inside `torch.device("meta")`: torch 2.6's dynamo, which transformers 4.46's
# modeling_utils imports, fails to initialise on the meta device.
import transformers.modeling_utils  # noqa: F401  isort: skip
from dimple_tools.paths import REPOSITORY_ROOT

ROOT = REPOSITORY_ROOT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=str(ROOT / "tests" / "data" / "dimple7b_state_dict.json"),
                        help="JSON of parameter name -> shape")
    args = parser.parse_args(argv)
    if not pathlib.Path(args.reference).is_file():
        parser.error(f"--reference {args.reference} is not a file")
    expected = json.loads(pathlib.Path(args.reference).read_text())
    config = AutoConfig.from_pretrained(str(ROOT), trust_remote_code=True)
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=True)
    actual = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    wrong = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
    for name in missing:
        print("missing:", name, expected[name])
    for name in unexpected:
        print("unexpected:", name, actual[name])
    for name in wrong:
        print("shape:", name, "expected", expected[name], "got", actual[name])
    matching = len(expected) - len(missing) - len(wrong)
    print(f"state dict layout: {matching}/{len(expected)} tensors match, {len(unexpected)} unexpected")
    return 1 if missing or unexpected or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
