"""The shape of the code that later work relies on: no import circles inside megacore, a model that knows
nothing of parallelism, and files short enough to read in one sitting."""

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "megacore"
MAX_LINES = 450  # the config schema, one dataclass per section, is the one exception


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """megacore module -> the megacore modules it imports (at any depth of its code: local imports count)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def test_no_module_imports_a_module_that_imports_it():
    graph = _imports()
    # A package's __init__ re-exporting its modules is not a circle of code.
    circles = [(a, b) for a in graph for b in graph[a]
               if a in _reaches(graph, b) and not (a.startswith(b + ".") or b.startswith(a + "."))]
    assert not circles, circles


def test_parallelism_and_the_loss_reach_nothing_of_the_training_loop():
    """The layering: model -> loss -> parallel -> train; parallel/ applies parallelism to any model and
    the train module (megacore/train/) drives it, never the other way round."""
    graph = _imports()
    for m in [m for m in graph if m.startswith("megacore.parallel") or m in ("megacore.loss", "megacore.model")]:
        assert not {t for t in graph[m] if t.startswith("megacore.train")}, m


def test_the_model_returns_tensors_and_the_loss_is_defined_once():
    import torch

    import data_pipeline.loader
    import megacore.loss
    from megacore.config import ModelConfig
    from megacore.model.llama import KVCache, Llama

    model = Llama(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, max_seq_len=16))
    tokens = torch.randint(0, 64, (2, 8))
    outputs = {"logits": model(tokens), "hidden": model(tokens, return_hidden=True),
               "cached": model(tokens, cache=KVCache(model, 2, 16))}
    assert {k: (type(v), tuple(v.shape)) for k, v in outputs.items()} == {
        "logits": (torch.Tensor, (2, 8, 64)), "hidden": (torch.Tensor, (2, 8, 32)), "cached": (torch.Tensor, (2, 8, 64))}
    defined = [p for p in [*PACKAGE.rglob("*.py"), *(REPO / "data_pipeline").rglob("*.py")]
               if "IGNORE_INDEX =" in p.read_text()]
    assert defined == [REPO / "data_pipeline/loader.py"], defined
    assert megacore.loss.IGNORE_INDEX is data_pipeline.loader.IGNORE_INDEX


def test_the_model_imports_nothing_of_megacore_but_its_config():
    graph = _imports()
    model_modules = [m for m in graph if m.startswith("megacore.model")]
    for m in model_modules:
        outside = {t for t in graph[m] if not t.startswith(("megacore.model", "megacore.config"))}
        assert not outside, (m, outside)


def test_parallel_code_knows_nothing_of_checkpoints():
    graph = _imports()
    for m in (m for m in graph if m.startswith("megacore.parallel")):
        assert not {t for t in _reaches(graph, m) if t.startswith("megacore.checkpoint")}, m


def test_no_source_file_is_over_450_lines_but_the_config_schema():
    long = {str(p.relative_to(REPO)): n for p in [*PACKAGE.rglob("*.py"), *(REPO / "data_pipeline").rglob("*.py"),
                                                  *(REPO / "launcher").rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES and p != PACKAGE / "config" / "schema.py"}
    assert not long, long
