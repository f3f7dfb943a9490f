"""The repository's shape: one installable package with console scripts, imports one way, no path edits, a model
card within its size with every linked page present."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
REMOTE_CODE = ("configuration_dimple.py", "modeling_dimple.py", "generation_utils.py", "processing_dimple.py")


def tracked_python_files() -> list:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:
        return [ROOT / name for name in listed.stdout.split()]
    # not a git checkout (a copy of the tree): every module outside environments and caches
    return [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def uses_sys_path(path) -> bool:
    return any(
        isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys"
        for node in ast.walk(ast.parse(path.read_text()))
    )


def test_nothing_edits_sys_path():
    assert [str(p.relative_to(ROOT)) for p in tracked_python_files() if uses_sys_path(p)] == []


def test_remote_code_imports_only_torch_transformers_and_itself():
    allowed = {"torch", "transformers", "huggingface_hub", "PIL"}  # huggingface_hub and PIL: transformers' own deps
    for name in REMOTE_CODE:
        tree = ast.parse((ROOT / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: each other
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            standard = {root for root in roots if root in sys.stdlib_module_names}
            assert roots - standard <= allowed, f"{name}:{node.lineno} imports {roots}"
            assert "dimple_tools" not in roots


def test_no_private_name_is_imported_from_another_module():
    for path in tracked_python_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("dimple", "test_")):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)}:{node.lineno} imports {private}"


def test_the_packages_import_and_the_console_scripts_answer_help():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"dimple-demo", "dimple-web-demo", "dimple-train", "dimple-bench"} <= set(scripts)
    code = "import dimple.modeling_dimple, dimple_tools; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"
    bin_dir = pathlib.Path(sys.executable).parent
    for name in scripts:
        if not (bin_dir / name).exists():
            pytest.fail(f"console script {name} is not installed: run `pip install -e .` (make venv does)")
        extra = "gradio" if name == "dimple-web-demo" else "litserve" if name.startswith("dimple-serve") else None
        if extra and subprocess.run([sys.executable, "-c", f"import {extra}"], capture_output=True).returncode:
            continue  # its optional packages are not installed here
        result = subprocess.run([str(bin_dir / name), "--help"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "usage" in result.stdout.lower(), (name, result.stderr[-2000:])


def test_the_model_card_is_short_and_its_links_exist():
    card = (ROOT / "README.md").read_text()
    assert len(card) <= 10_000, len(card)
    assert card.startswith("---\n") and "pipeline_tag: image-text-to-text" in card and "@article{yu2025dimple" in card
    links = re.findall(r"\]\(((?:docs|assets|tiny-dimple)/[^)#]+)\)", card)
    assert {"docs/development.md", "docs/performance.md", "docs/compatibility.md"} <= set(links)
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == []


def test_docs_link_only_to_files_that_exist():
    for page in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name} links to {link}"


def test_the_benchmark_is_a_small_harness():
    files = ("dimple_tools/bench/benchmark.py", "scripts/device_check.sh", "dimple_tools/tiny/configs.py")
    assert sum(len((ROOT / name).read_text().splitlines()) for name in files) <= 700


# Which tool subpackages each may import besides `tiny` (the task every tool shows; docs/development.md's map).
TOOL_IMPORTS_ALLOWED = {
    "tiny": {"training"},  # the tiny build trains through dimple-train
    "demos": set(), "serving": set(), "evaluation": set(), "bench": set(), "checkpoint": set(), "training": set(),
}


def test_tool_subpackages_import_one_way():
    tools = ROOT / "dimple_tools"
    found = {path.name for path in tools.iterdir() if (path / "__init__.py").is_file()}
    assert found == set(TOOL_IMPORTS_ALLOWED), "a new subpackage belongs in docs/development.md's map and here"
    for package, allowed in TOOL_IMPORTS_ALLOWED.items():
        for path in (tools / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                    [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "dimple_tools" and len(parts) > 1 and parts[1] in TOOL_IMPORTS_ALLOWED:
                        assert parts[1] in allowed | {package, "tiny"}, f"{path.relative_to(ROOT)} imports {name}"
    assert not [p for p in tools.glob("*.py") if p.name not in ("__init__.py", "paths.py", "compat.py", "length.py")], \
        "modules belong in a subpackage"
