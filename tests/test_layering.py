"""The package's layers, proven from the import graph (read with `ast`, nothing imported).

Data flows ingest → experts → render → store, and finetune/export read the store; the build
composes them all. So a layer may use the shared plain types (`curation/*.py` at the top:
manifest, items, findings, imaging, keys, errors, rows) and the layers below it, never the ones
above, and the light layers never pull in torch or Ray. Imports inside functions count: a lazy
import is still a dependency. The check follows imports transitively through the project's own
modules, so a rule cannot be dodged through a helper module.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("curation", "expert_runners")

# layer (module prefix) → module prefixes it must not reach, directly or through project modules
RULES: dict[str, tuple[str, ...]] = {
    "expert_runners": ("curation.render", "curation.build", "curation.store", "curation.ingest"),
    "curation.render": ("expert_runners", "curation.ingest", "curation.build", "curation.store", "torch", "ray", "monai"),
    "curation.finetune": ("curation.build", "expert_runners", "curation.render", "curation.ingest"),
    "curation.export": ("curation.build", "expert_runners", "curation.render", "curation.ingest", "torch", "ray"),
    "curation.ingest": ("ray", "curation.build", "curation.render", "curation.store", "expert_runners"),
    "curation.store": ("curation.build", "expert_runners", "curation.render", "curation.ingest", "torch", "ray"),
}
SHARED = ("curation.manifest", "curation.items", "curation.findings", "curation.imaging", "curation.keys", "curation.errors",
          "curation.rows", "curation.expert_info")
RULES.update({m: ("curation.ingest", "curation.render", "curation.build", "curation.store", "curation.finetune",
                  "expert_runners", "torch", "ray") for m in SHARED})


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py")) if "demo_training" not in p.parts}


@cache
def imports(module: str) -> frozenset[str]:
    """Every module `module` imports (absolute names; relative imports resolved)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return frozenset(found)


def reached(module: str) -> dict[str, str]:
    """Every module reachable from `module` → the project module that imports it (a witness)."""
    out: dict[str, str] = {}
    todo = [module]
    while todo:
        current = todo.pop()
        for target in imports(current):
            if target in out:
                continue
            out[target] = current
            if target in MODULES:
                todo.append(target)
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations() -> list[tuple[str, str, str]]:
    """(module, forbidden prefix, a project module that imports it) for every broken rule."""
    found = {}
    for module in MODULES:
        for layer, forbidden in RULES.items():
            if not _under(module, layer):
                continue
            for target, via in reached(module).items():
                bad = next((f for f in forbidden if _under(target, f)), None)
                if bad and not _under(target, layer):
                    found.setdefault((module, bad), via if _under(via, layer) or via == module else f"{via}, through {module}")
    return sorted((m, b, v) for (m, b), v in found.items())


def test_layers_import_only_what_lies_below_them():
    bad = violations()
    assert not bad, "layering broken:\n" + "\n".join(f"  {m} reaches {t} (imported by {v})" for m, t, v in bad)



def test_the_rules_see_every_layer():
    layers = {m.split(".")[1] if m.startswith("curation.") and m.count(".") else m for m in MODULES}
    assert {"ingest", "render", "build", "store", "finetune"} <= layers
