"""The package's layers, from the bottom: config, parallel, sampling, cache, text (pure) -> model -> quant -> vision, loader ->
engine -> generation -> server, cli, training, bench. No module imports one of a higher layer (read from
the source, lazy imports inside functions included). Among the top four: the command line may import the
server and training (it runs them), the benchmarks import training's task generators; nothing else."""

import ast
from pathlib import Path

import diffusiongemma

ROOT = Path(diffusiongemma.__file__).parent
ORDER = ["config", "parallel", "sampling", "cache", "text", "model", "quant", "vision", "loader", "engine", "generation"]
TOP = {"server": set(), "training": set(), "bench": {"training"}, "cli": {"server", "training"}}


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _imports(path: Path, module: str):
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("diffusiongemma."):
                yield node.lineno, name


def allowed(src: str, dst: str) -> bool:
    if src == dst or not src or src == "__main__":
        return True
    if src in TOP:
        return dst not in TOP or dst in TOP[src]
    if dst in TOP:
        return False
    return ORDER.index(dst) < ORDER.index(src)


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for line, name in _imports(path, module):
            if not allowed(_layer(module), _layer(name)):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_every_layer_is_known():
    layers = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
              if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())) and p.stem != "__pycache__"}
    assert layers - {"__init__", "__main__"} == set(ORDER) | set(TOP)
