"""The house's shape, checked on every ``make test``.

* Imports: no circle anywhere in ``OnePromptSegLib`` (a function-level import counts as much as one at the top), the
  runtime (``OnePromptSegLib/*.py``) and the Slicer module never import the tooling (``OnePromptSegLib/tooling``).
* The extension install: the files ``OnePromptSeg/CMakeLists.txt`` installs are exactly the runtime, the module, one
  checkpoint and the manifest, and from that tree alone the module's own path set-up finds the library, which finds
  and loads the checkpoint.
"""
from __future__ import annotations

import ast
import glob
import json
import os
import re
import shutil
import site
import subprocess
import sys
import textwrap
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = "OnePromptSegLib"
TOOLING = f"{LIB}.tooling"
MODULE_CMAKE = os.path.join(ROOT, "OnePromptSeg", "CMakeLists.txt")


# ------------------------------------------------------------------------------------------------ import graph

def _module_name(path: str, base: str) -> str:
    rel = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph(base: str, package: str) -> Dict[str, Set[str]]:
    """{module: modules of ``package`` it imports}, from the source of every .py under ``base/package``.

    Every import statement counts, wherever it is (top level, function, ``if TYPE_CHECKING``): a lazy import is still
    a dependency.  ``from . import x`` names the submodule ``x`` where one exists.
    """
    files = sorted(glob.glob(os.path.join(base, package, "**", "*.py"), recursive=True))
    modules = {_module_name(f, base): f for f in files}
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        here = name if is_pkg else name.rpartition(".")[0]
        deps: Set[str] = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    parent = ".".join(parts[: len(parts) - node.level + 1])
                    src = f"{parent}.{node.module}" if node.module else parent
                else:
                    src = node.module or ""
                # ``from x import y``: the submodule x.y where there is one, else x itself
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src for a in node.names]
            for t in targets:
                parts = t.split(".")
                for n in range(len(parts), 0, -1):  # the longest prefix of t that is a module of the package
                    cand = ".".join(parts[:n])
                    if cand in modules:
                        if cand != name:
                            deps.add(cand)
                        break
        graph[name] = deps
    return graph


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def runtime_into_tooling(graph: Dict[str, Set[str]], package: str = LIB) -> List[str]:
    """'a -> b' for every runtime module a (not under ``package.tooling``) that imports a tooling module b."""
    tooling = f"{package}.tooling"
    is_tool = lambda m: m == tooling or m.startswith(tooling + ".")  # noqa: E731
    return sorted(f"{a} -> {b}" for a, deps in graph.items() if not is_tool(a) for b in deps if is_tool(b))


def test_the_checks_find_a_circle_and_a_runtime_import_of_tooling(tmp_path):
    """The checker itself, on a made-up package: it must see a lazy import circle and a runtime -> tooling import."""
    pkg = tmp_path / "pkg"
    (pkg / "tooling").mkdir(parents=True)
    for rel, text in {"__init__.py": "", "a.py": "from .b import f\n",
                      "b.py": "def f():\n    from . import a\n    from .tooling.train import g\n",
                      "c.py": "import numpy\nfrom pkg import tooling\n", "tooling/__init__.py": "",
                      "tooling/train.py": "from ..c import f\n\ndef g():\n    pass\n"}.items():
        (pkg / rel).write_text(text)
    graph = import_graph(str(tmp_path), "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.tooling.train"] == {"pkg.c"}
    assert circles(graph) == [["pkg.a", "pkg.b"]]
    assert runtime_into_tooling(graph, "pkg") == ["pkg.b -> pkg.tooling.train", "pkg.c -> pkg.tooling"]


def test_no_import_circle_and_the_runtime_never_imports_tooling():
    graph = import_graph(ROOT, LIB)
    assert f"{LIB}.session" in graph and f"{TOOLING}.train" in graph  # the walk saw both halves
    assert not circles(graph), f"import circles: {circles(graph)}"
    assert not runtime_into_tooling(graph), f"runtime imports tooling: {runtime_into_tooling(graph)}"
    # the training script's pieces that test-time adaptation needs come from the runtime's own module
    assert f"{LIB}.training_parts" in graph[f"{LIB}.adapt"] and f"{LIB}.training_parts" in graph[f"{TOOLING}.train"]


def test_the_slicer_module_never_imports_tooling():
    for path in [os.path.join(ROOT, "OnePromptSeg", "OnePromptSeg.py")] + glob.glob(
            os.path.join(ROOT, "OnePromptSeg", "*", "*.py")):
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        bad = [n for n in names if n.startswith(TOOLING)]
        assert not bad, f"{os.path.relpath(path, ROOT)} imports tooling: {bad}"


def test_the_mrml_adapter_imports_no_qt_and_no_scripted_module_framework():
    """OnePromptSeg/OnePromptSegMRML/ is the data path (nodes -> arrays -> engine -> segments): numpy, vtk, Slicer's
    MRML classes and slicer.util, the library, and itself; never Qt, CTK or slicer.ScriptedLoadableModule & co."""
    allowed = ("numpy", "vtk", "slicer", "slicer.util", "slicer.i18n", "OnePromptSegLib", "typing", "logging",
               "warnings")
    for path in sorted(glob.glob(os.path.join(ROOT, "OnePromptSeg", "OnePromptSegMRML", "*.py"))):
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
        bad = [n for n in names if not any(n == a or n.startswith(a + ".") and a != "slicer" for a in allowed)]
        assert not bad, f"{os.path.relpath(path, ROOT)} imports {bad}"


# ------------------------------------------------------------------------------------------------ extension install

def _cmake_sets() -> Dict[str, List[str]]:
    text = "\n".join(line.split("#", 1)[0] for line in open(MODULE_CMAKE, encoding="utf-8").read().splitlines())
    return {name: re.findall(r"\S+", body) for name, body in re.findall(r"set\(\s*(\w+)\s+(.*?)\)", text, re.S)}


def install_tree(dest: str) -> List[str]:
    """Lay out what OnePromptSeg/CMakeLists.txt installs into Slicer's qt-scripted-modules folder, as it places them:
    module scripts and resources at their paths under OnePromptSeg/, library files under OnePromptSegLib/ (copied by
    ``configure_file``), weight files at their paths under the repository root.  Returns the relative paths."""
    sets = _cmake_sets()
    placed = []

    def put(src: str, rel: str) -> None:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copyfile(src, os.path.join(dest, rel))
        placed.append(rel)

    module_dir = os.path.join(ROOT, "OnePromptSeg")
    for item in sets["MODULE_PYTHON_SCRIPTS"] + sets["MODULE_PYTHON_RESOURCES"]:
        item = item.replace("${MODULE_NAME}", "OnePromptSeg")
        if item == "${ONEPROMPTSEG_LIB_SCRIPTS}":
            for lib in sets["ONEPROMPTSEG_LIB_FILES"]:
                put(os.path.normpath(os.path.join(module_dir, lib)), f"{LIB}/{os.path.basename(lib)}")
        else:  # scripts and resources keep their paths relative to the module's folder
            put(os.path.join(module_dir, item), item)
    for item in sets["ONEPROMPTSEG_WEIGHT_FILES"]:
        put(os.path.join(ROOT, item), item)
    return sorted(placed)


def test_the_extension_installs_the_runtime_one_checkpoint_and_the_manifest(tmp_path):
    placed = install_tree(str(tmp_path))
    runtime = sorted(f"{LIB}/{os.path.basename(p)}" for p in glob.glob(os.path.join(ROOT, LIB, "*.py")))
    assert [p for p in placed if p.startswith(LIB + "/")] == runtime, "the install must hold exactly the runtime"
    assert not any("tooling" in p for p in placed)
    checkpoints = [p for p in placed if p.endswith((".pt", ".safetensors"))]
    manifest = json.load(open(os.path.join(ROOT, "weights_manifest.json")))
    assert len(checkpoints) == 1 and len(manifest["models"]) == 1, (checkpoints, [m["name"] for m in
                                                                                  manifest["models"]])
    assert manifest["models"][0]["name"] == manifest["default"] and manifest["models"][0]["file"] == checkpoints[0]
    assert "weights_manifest.json" in placed
    shipped = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "Resources", "Models", "*")))
    assert shipped == checkpoints, "Resources/Models/ must hold the default checkpoint only"
    others = set(placed) - set(runtime) - set(checkpoints) - {"weights_manifest.json"}
    assert all(p.startswith(("OnePromptSeg.py", "SegmentEditorOnePromptLib/", "OnePromptSegMRML/", "Resources/"))
               for p in others), others


def test_the_installed_module_finds_the_library_and_its_checkpoint(tmp_path):
    """From the install tree alone (not the repository, nor its editable install): the module's ``_addLibraryToPath`` makes the runtime
    importable, every runtime module imports, the tooling is absent, and the default checkpoint is listed and
    loads (sha256 checked)."""
    install_tree(str(tmp_path))
    source = open(os.path.join(tmp_path, "OnePromptSeg.py"), encoding="utf-8").read()
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "_addLibraryToPath")
    script = textwrap.dedent(f"""
        import importlib, json, os, sys
        sys.path += {site.getsitepackages()!r}  # torch & co., without the .pth of the repository's editable install
        __file__ = {os.path.join(str(tmp_path), "OnePromptSeg.py")!r}
        """) + ast.get_source_segment(source, fn) + textwrap.dedent("""
        base = _addLibraryToPath()
        import OnePromptSegLib
        from OnePromptSegLib.checkpoints import list_models, load_model
        names = sorted(f[:-3] for f in os.listdir(os.path.join(base, 'OnePromptSegLib')) if f.endswith('.py'))
        for n in names:
            importlib.import_module('OnePromptSegLib.' + n)
        try:
            importlib.import_module('OnePromptSegLib.tooling')
            tooling = True
        except ImportError:
            tooling = False
        models = list_models()
        m = load_model(None, 'cpu')
        print(json.dumps(dict(base=base, lib=OnePromptSegLib.__file__, tooling=tooling,
                              models=[(e['name'], e['path'], e['default']) for e in models], loaded=m.name)))
        """)
    out = subprocess.run([sys.executable, "-S", "-c", script], cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["base"] == str(tmp_path) and res["lib"].startswith(str(tmp_path)), res
    assert res["tooling"] is False
    assert len(res["models"]) == 1 and res["models"][0][2] and res["models"][0][1].startswith(str(tmp_path))
    assert os.path.isfile(res["models"][0][1]) and res["loaded"] == res["models"][0][0]
