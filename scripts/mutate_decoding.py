"""Mutation check of the decoding tests: put one-line bugs into `generation_utils.py` and see which tests
catch each one.

Every mutation replaces one exact snippet of the module (it must occur once: a mutation that no longer
applies after a change to the decoder is reported, not skipped silently). Each runs in a copy of the
repository (its tracked and untracked, not ignored files), so the working tree and anything running from it
are never touched. A mutation that no test catches is a gap in the tests; the exit status is 1 then.

    python scripts/mutate_decoding.py                 # every mutation, the decoding tests
    python scripts/mutate_decoding.py --only entropy-sign top-p-removed --first
    python scripts/mutate_decoding.py --list
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = "generation_utils.py"
COPIES = (MODULE, f"tiny-dimple/{MODULE}")  # the shipped tiny model carries the same module
DEFAULT_TESTS = ("tests/test_decoding_oracles.py", "tests/test_decoding_robustness.py", "tests/test_generation.py",
                 "tests/test_block_decoding.py")

# name -> (what the bug is, the exact snippet, its replacement)
MUTATIONS = {
    "entropy-sign": (
        "the sign of the entropy confidence flipped",
        "return (probs * torch.log(probs + 1e-10)).sum(dim=-1)",
        "return -(probs * torch.log(probs + 1e-10)).sum(dim=-1)",
    ),
    "margin-is-top-probability": (
        "topk_margin reduced to the top probability (p1 instead of p1 - p2)",
        "return top2[..., 0] - top2[..., 1]",
        "return top2[..., 0]",
    ),
    "top-p-removed": (
        "the top_p filter removed",
        "if top_p is not None and top_p < 1:",
        "if False:",
    ),
    "temperature-ignored": (
        "the division by temperature removed",
        "logits = logits / temperature",
        "logits = logits",
    ),
    "alg-temp-ignored": (
        "alg_temp ignored: the most confident positions instead of sampled ones",
        "    elif alg_temp:\n",
        "    elif False:\n",
    ),
    "dream-origin-fixed-count": (
        "Dream's origin commits a fixed count instead of an independent draw per position",
        'alg = "origin-ratio" if config.alg in ("origin", "origin-ratio") else config.alg',
        "alg = config.alg",
    ),
    "threshold-last-step-rule-removed": (
        "with a confidence threshold, the last step no longer commits every mask",
        "confident = is_mask & (confidence > config.alg_p_threshold) if not last_step else is_mask",
        "confident = is_mask & (confidence > config.alg_p_threshold)",
    ),
    "prefilled-pass-stale-canvas": (
        "the prefilled pass no longer writes the tokens committed so far into the canvas it runs",
        "        self.embeds[:, self.prompt_len :] = self.model.get_input_embeddings()(self.canvas)\n",
        "        if kind != \"tail\": self.embeds[:, self.prompt_len :] = self.model.get_input_embeddings()(self.canvas)\n",
    ),
    "window-pass-stale-canvas": (
        "the dual cache's window pass no longer embeds the current canvas",
        "        self.embeds[:, self.prompt_len :] = self.model.get_input_embeddings()(self.canvas)\n",
        "        if kind != \"window\": self.embeds[:, self.prompt_len :] = self.model.get_input_embeddings()(self.canvas)\n",
    ),
    "window-positions-not-moved": (
        "the dual cache's window stays at the first block",
        "            self.queries[\"window\"].copy_(",
        "            (lambda _: None)(",
    ),
    "top-k-removed": (
        "the top_k filter removed",
        "    if top_k is not None:\n        kth",
        "    if False:\n        kth",
    ),
    "filtered-confidence-always": (
        "use_original_confidence ignored: confidence from the filtered distribution",
        "probs = (raw if self.original_confidence else filtered).softmax(dim=-1)",
        "probs = filtered.softmax(dim=-1)",
    ),
    "autoregressive-schedule-count": (
        "autoregressive commits the schedule's count of leftmost masks instead of one",
        "            count = torch.ones_like(count)\n",
        "            pass\n",
    ),
    "origin-leftmost": (
        "origin chooses the leftmost masks instead of random ones",
        "        if alg in (\"origin\", \"origin-ratio\"):\n            self.priority = random_priority\n",
        "        if alg in (\"origin\", \"origin-ratio\"):\n            self.priority = leftmost_priority\n",
    ),
    "dream-last-step-partial": (
        "Dream's last step commits the ratio's count instead of every mask left",
        "ratio = 1.0 if last_step else 1 - s / t",
        "ratio = 1 - s / t",
    ),
    "schedule-skips-zero-counts-removed": (
        "the dim schedule takes the first point below r even when it commits nothing",
        "valid = (taus[None, :] < r[:, None]) & (counts >= 1)",
        "valid = taus[None, :] < r[:, None]",
    ),
    "mask-token-allowed": (
        "the mask token may be generated",
        'candidates[..., self.mask_token_id] = float("-inf")',
        "pass",
    ),
    "non-finite-logits-unchecked": (
        "non-finite logits are no longer flagged",
        "problem = non_finite_logits(masked_logits).to(x.device)",
        "problem = torch.zeros((), dtype=torch.bool, device=x.device)",
    ),
    "stopping-criteria-ignored": (
        "stopping criteria no longer stop their rows",
        "            active = active & ~done\n",
        "            active = active\n",
    ),
    "return-sequences-mix-prompts": (
        "num_return_sequences tiles the prompts (a b a b) instead of repeating each (a a b b)",
        "x[:, :prompt_len] = input_ids.repeat_interleave(n_rep, 0)",
        "x[:, :prompt_len] = input_ids.repeat(n_rep, 1)",
    ),
}


def repository_files() -> list:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True,
        capture_output=True,
    ).stdout.decode().split("\0")
    return [name for name in listed if name and (ROOT / name).is_file()]


def mutate(source: str, name: str) -> str:
    _, old, new = MUTATIONS[name]
    found = source.count(old)
    if found != 1:
        raise LookupError(f"mutation {name!r}: its snippet occurs {found} times in {MODULE} (must be once)")
    return source.replace(old, new)


def failing_tests(output: str) -> list:
    return sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)))


def run_tests(copy: Path, tests: list, first: bool, timeout: float) -> tuple:
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    if first:
        command.append("-x")
    # The copy's packages come first on the path, before the editable install of the working tree: `dimple`
    # (a link named after the package, to the copy's root) and `dimple_tools`.
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), str(copy.parent / "packages")])}
    try:
        result = subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=timeout, env=environment)
    except subprocess.TimeoutExpired:
        return None, ["(timed out)"]
    return result.returncode, failing_tests(result.stdout + result.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(MUTATIONS), metavar="NAME", help="these mutations only")
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS), help="test files or node ids to run")
    parser.add_argument("--first", action="store_true", help="stop each run at its first failing test (faster)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation run (default 900)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (what, _, _) in MUTATIONS.items():
            print(f"{name:36s} {what}")
        return 0
    names = args.only or list(MUTATIONS)
    original = (ROOT / MODULE).read_text()
    mutated = {name: mutate(original, name) for name in names}  # every snippet checked before any run

    results = []
    with tempfile.TemporaryDirectory(prefix="dimple-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        for name in repository_files():
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
        (Path(tmp) / "packages").mkdir()
        (Path(tmp) / "packages" / "dimple").symlink_to(copy, target_is_directory=True)
        status, failures = run_tests(copy, args.tests, True, args.timeout)
        if status != 0:
            print(f"the tests fail without any mutation: {failures}", file=sys.stderr)
            return 2
        for name in names:
            for path in COPIES:
                (copy / path).write_text(mutated[name])
            start = time.perf_counter()
            status, failures = run_tests(copy, args.tests, args.first, args.timeout)
            caught = status != 0
            results.append(dict(mutation=name, bug=MUTATIONS[name][0], caught=caught, failing_tests=failures,
                                seconds=round(time.perf_counter() - start, 1)))
            shown = ", ".join(failures[:3]) + (f" (+{len(failures) - 3} more)" if len(failures) > 3 else "")
            print(f"{'caught  ' if caught else 'SURVIVED'} {name:36s} {shown}", flush=True)
        for path in COPIES:
            (copy / path).write_text(original)

    survivors = [r["mutation"] for r in results if not r["caught"]]
    print(f"\n{len(results) - len(survivors)} of {len(results)} mutations caught"
          + (f"; survived: {', '.join(survivors)}" if survivors else ""))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
