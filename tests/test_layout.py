"""The package layout's rules: every module imports on its own, imports point down, no private reach-ins,
the library never names a command-line flag."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import gen_cli

PACKAGE = Path(gen_cli.__file__).parent
# Lower layers first: a module may import from its own package and from packages listed after it.
LAYERS = [
    "cli",
    "commands",
    "lab",
    "train",
    "serve",
    "infer",
    "formats",
    "native",
    "quant",
    "memory",
    "cache",
    "model",
    "text",
    "base",
]
BASE = {"errors", "limits", "resources", "atomic", "runtime", "pages", "collector", "__init__", "__main__"}


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], "gen_cli.") if m.name != "gen_cli.__main__")


def _layer(module: str) -> str:
    part = module.split(".")[1] if module.count(".") else "__init__"
    return "base" if part in BASE else part


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every `from gen_cli… import …` in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gen_cli"):
            found.append((node.module, [a.name for a in node.names]))
            # `from gen_cli.formats import hf` imports the module gen_cli.formats.hf
            found += [(f"{node.module}.{a.name}", []) for a in node.names if _is_module(f"{node.module}.{a.name}")]
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / f"{rel}.py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _source(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    return PACKAGE / rel / "__init__.py" if (PACKAGE / rel).is_dir() else PACKAGE / f"{rel}.py"


def test_every_module_imports_on_its_own():
    # One interpreter, the package forgotten before each import: an import cycle entered from any side
    # fails here, whatever order the rest of the suite imported things in.
    code = (
        "import importlib, sys\n"
        f"for name in {_modules()!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'gen_cli' or m.startswith('gen_cli.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_imports_point_down_and_never_reach_for_private_names():
    for module in _modules():
        layer = LAYERS.index(_layer(module))
        for target, names in _imports(_source(module)):
            if target == "gen_cli":
                continue  # the version
            assert LAYERS.index(_layer(target)) >= layer, f"{module} imports {target}, a layer above it"
            same_package = target.rsplit(".", 1)[0] == module.rsplit(".", 1)[0]
            private = [n for n in names if n.startswith("_")]
            assert same_package or not private, f"{module} imports private {private} from {target}"


def test_the_library_names_values_not_flags():
    for module in _modules():
        if _layer(module) in ("cli", "commands"):
            continue
        tree = ast.parse(_source(module).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = ast.unparse(node.exc)
                assert "'--" not in text and '"--' not in text and " --" not in text, f"{module}: {text[:120]}"


def test_the_cli_shows_a_named_value_as_the_flag_of_the_command_that_ran():
    import typer.main

    from gen_cli.cli import app, user_message
    from gen_cli.errors import UsageError

    commands = typer.main.get_command(app).commands
    error = UsageError("max_new_tokens must be ≥ 0, got -1", params=("max_new_tokens",))
    assert user_message(error, commands["generate"]) == "--max-new-tokens must be ≥ 0, got -1"
    assert user_message(error, commands["convert"]) == "max_new_tokens must be ≥ 0, got -1"  # no such flag there


def test_no_import_cycle_even_through_imports_inside_functions():
    graph = {m: {t for t, _ in _imports(_source(m)) if t in _MODULES} for m in _MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in _MODULES:
        if module not in state:
            visit(module, [])


_MODULES = set(_modules())
