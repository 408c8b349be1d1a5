"""The codebase's shape: no import cycles (lazy imports included), shared helpers reached through the public
API, no execution state in mutable attributes or name-prefix surgery outside the registry."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tpcvit"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every tpcvit module ``name`` imports, at module level or inside functions (a lazy import still cycles)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
            targets = subs if len(subs) == len(node.names) else [target, *subs]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t not in mods and "." in t:
                t = t.rsplit(".", 1)[0]
            # a module's own packages are imported before it anyway: not an edge of a cycle
            if t in mods and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 30 and "tpcvit.runtime" in graph["tpcvit.models.vit"]  # the walk sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_models_package_imports_the_vit_adapter():
    outside = [name for name, deps in import_graph().items()
               if "tpcvit.models.vit" in deps and not name.startswith("tpcvit.models")]
    assert outside == []


def test_no_mutable_execution_flags_or_prefix_surgery():
    """Execution state is an ExecutionPolicy, LV-ViT's token logits come from their own method, and only the
    registry (models/_builder.py) knows how model names are prefixed."""
    pattern = re.compile(r"tpc_force_|return_dense|removeprefix\(\"tpc_\"\)|tpc_mode\b|tpc_keep\b|topk_index")
    hits = [f"{p.relative_to(ROOT)}:{i}" for folder in ("tpcvit", "tests") for p in (ROOT / folder).rglob("*.py")
            if p.name != "test_structure.py" for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []


def test_tests_never_set_private_attributes_of_models():
    assignment = re.compile(r"^\s*(model|m|tpc|net|dense)\w*\._\w+\s*=")
    hits = [f"{p.name}:{i}" for p in (ROOT / "tests").glob("test_*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if assignment.search(line)]
    assert hits == []


def _tiny_kwargs(name: str) -> dict:
    if "swin" in name:
        return dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                    num_classes=3)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    return {**kw, "start_layer": 1} if name.startswith("tpc_") else kw


def test_every_registered_token_reducer_implements_the_one_protocol():
    """TPC in every family, every peer, and a patched timm ViT: the same protocol, a knob that moves the cost."""
    import timm
    import torch

    import tpcvit
    from tpcvit.budget import knob_bounds, set_knob
    from tpcvit.models import PEER_METHODS
    from tpcvit.reducer import TokenReducer, reducers

    names = timm.list_models("tpc_*") + [n for m in PEER_METHODS for n in timm.list_models(f"{m}_*")]
    assert len(names) >= 20
    patched = tpcvit.patch(timm.create_model("deit_tiny_patch16_224", **_tiny_kwargs("deit")), keep=0.5)
    x = torch.randn(2, 3, 32, 32)
    for name, model in [(n, timm.create_model(n, **_tiny_kwargs(n))) for n in names] + [("patched", patched)]:
        model.eval()
        assert isinstance(model, TokenReducer) and reducers(model) == [model], name
        lo, hi, raises = knob_bounds(model)
        assert lo < hi, name
        costs = []
        with torch.no_grad():
            for value in (lo + 0.25 * (hi - lo), hi):
                set_knob(model, value)
                costs.append(model.gmacs_per_image(model.forward_with_trace(x)[1]).mean().item())
        assert (costs[1] >= costs[0]) == raises, (name, costs)
    assert not isinstance(timm.create_model("deit_tiny_patch16_224", **_tiny_kwargs("deit")), TokenReducer)
