"""The Slicer module and its packaging, checked without Slicer.

* the module files compile; every ``self.ui.X`` exists in the .ui and every SlicerParameterName is a parameter;
* OnePromptSeg/CMakeLists.txt lists every OnePromptSegLib/*.py, every module resource and the bundled weights;
* the ExtensionsIndex entry OnePromptSeg.json agrees with the top-level CMakeLists.txt and the catalog schema;
* the library never imports Slicer, Qt, VTK or CTK;
* the module's test class runs all its tests; the icons are 128x128 PNGs;
* ``slicer_api_check`` (../shared/tools) finds no unknown Slicer/Qt/VTK/CTK name in the module.
"""
from __future__ import annotations

import ast
import glob
import json
import os
import py_compile
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "OnePromptSeg")
MODULE_PY = os.path.join(MODULE_DIR, "OnePromptSeg.py")
EFFECT_DIR = os.path.join(MODULE_DIR, "SegmentEditorOnePromptLib")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "OnePromptSeg.ui")
MODULE_CMAKE = os.path.join(MODULE_DIR, "CMakeLists.txt")
TOP_CMAKE = os.path.join(ROOT, "CMakeLists.txt")
INDEX_JSON = os.path.join(ROOT, "OnePromptSeg.json")
MANIFEST = os.path.join(ROOT, "weights_manifest.json")
RAW_PREFIX = "https://raw.githubusercontent.com/onepromptseg/SlicerOnePromptSeg/main/"
# Properties of Slicer's extension catalog entry schema (Slicer/Slicer, main branch):
# https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json
SCHEMA_PROPERTIES = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                     "build_subdirectory", "enabled", "tier"}
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _module_py_files():
    return [MODULE_PY] + sorted(glob.glob(os.path.join(EFFECT_DIR, "*.py"))) + sorted(
        glob.glob(os.path.join(MODULE_DIR, "OnePromptSegMRML", "*.py")))


def _cmake_without_comments(path):
    return "\n".join(line.split("#", 1)[0] for line in _read(path).splitlines())


def _cmake_sets(path):
    """set(NAME value...) of a CMakeLists, values unquoted."""
    out = {}
    for name, body in re.findall(r"set\(\s*(\w+)\s+(.*?)\)", _cmake_without_comments(path), re.S):
        out[name] = [v.strip('"') for v in re.findall(r'"[^"]*"|\S+', body)]
    return out


def _cmake_listed(path):
    """Every path-like token of a CMakeLists, with ${MODULE_NAME} expanded."""
    text = _cmake_without_comments(path).replace("${MODULE_NAME}", "OnePromptSeg")
    return set(re.findall(r"[\w./-]+\.\w+", text))


# ------------------------------------------------------------------------------------------------ module files

def test_module_files_compile(tmp_path):
    for path in _module_py_files():
        py_compile.compile(path, cfile=str(tmp_path / (os.path.basename(path) + "c")), doraise=True)


def _ui_names():
    tree = ET.parse(UI_FILE)
    names = {e.get("name") for tag in ("widget", "layout", "action") for e in tree.iter(tag)}
    return tree, names - {None}


def test_every_ui_widget_used_by_the_code_exists():
    _tree, names = _ui_names()
    used = set(re.findall(r"self\.ui\.(\w+)", _read(MODULE_PY)))
    assert used, "the widget uses no self.ui.X?"
    missing = sorted(used - names)
    assert not missing, f"self.ui names missing from {os.path.relpath(UI_FILE, ROOT)}: {missing}"


def test_ui_parameter_names_are_parameters_of_the_parameter_node():
    tree, _names = _ui_names()
    bound = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.findtext("string")
    module = ast.parse(_read(MODULE_PY))
    (cls,) = [n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "OnePromptSegParameterNode"]
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in cls.decorator_list)
    parameters = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    unknown = {w: p for w, p in bound.items() if p not in parameters}
    assert not unknown, f"SlicerParameterName not in OnePromptSegParameterNode: {unknown}"
    assert len(set(bound.values())) == len(bound), "two widgets bound to one parameter"


def test_ui_scene_is_passed_to_every_mrml_widget():
    tree, _names = _ui_names()
    mrml = {w.get("name") for w in tree.iter("widget")
            if w.get("class") in ("qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget", "qSlicerMarkupsPlaceWidget")}
    connected = {c.findtext("receiver") for c in tree.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml and mrml <= connected, f"no setMRMLScene connection for {sorted(mrml - connected)}"


def test_module_has_the_standard_classes_and_a_complete_test():
    module = ast.parse(_read(MODULE_PY))
    classes = {n.name: n for n in module.body if isinstance(n, ast.ClassDef)}
    bases = {name: {getattr(b, "id", None) for b in c.bases} for name, c in classes.items()}
    assert "ScriptedLoadableModule" in bases["OnePromptSeg"]
    assert {"ScriptedLoadableModuleWidget", "VTKObservationMixin"} <= bases["OnePromptSegWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["OnePromptSegLogic"]
    assert "ScriptedLoadableModuleTest" in bases["OnePromptSegTest"]
    test = classes["OnePromptSegTest"]
    methods = {n.name: n for n in test.body if isinstance(n, ast.FunctionDef)}
    tests = {name for name in methods if name.startswith("test_")}
    assert "runTest" in methods and "setUp" in methods and len(tests) >= 5
    called = {n.attr for n in ast.walk(methods["runTest"]) if isinstance(n, ast.Attribute)}
    assert tests <= called, f"runTest does not run {sorted(tests - called)}"
    source = _read(MODULE_PY)
    for needed in ("downloadSample(\"MRHead\")", "PROMPT_POINTS", "PROMPT_BOX", "PROMPT_SCRIBBLES", "repropagate",
                   "undo(", "make_demo_volume"):
        assert needed in ast.get_source_segment(source, test), f"OnePromptSegTest does not exercise {needed}"


def test_effect_follows_the_scripted_effect_template():
    source = _read(MODULE_PY)
    assert 'slicer.app.connect("startupCompleted()", registerEditorEffect)' in source
    assert '"SegmentEditorOnePromptLib", "SegmentEditorEffect.py"' in source
    effect = _read(os.path.join(EFFECT_DIR, "SegmentEditorEffect.py"))
    for needed in ("class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect)", "def clone(self)",
                   "modifySelectedSegmentByLabelmap", "saveStateForUndo()", "setMRMLDefaults", "updateGUIFromMRML",
                   "updateMRMLFromGUI"):
        assert needed in effect
    assert os.path.isfile(os.path.join(EFFECT_DIR, "SegmentEditorEffect.png"))


# ------------------------------------------------------------------------------------------------ CMake

def test_module_cmake_lists_every_library_file():
    listed = _cmake_listed(MODULE_CMAKE)
    library = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "OnePromptSegLib", "*.py")))
    assert "__init__.py" in library
    missing = [f for f in library if f"../OnePromptSegLib/{f}" not in listed]
    assert not missing, f"OnePromptSeg/CMakeLists.txt does not list OnePromptSegLib files {missing}"


def test_module_cmake_lists_every_script_and_resource_and_they_exist():
    listed = _cmake_listed(MODULE_CMAKE)
    expected = {"OnePromptSeg.py", "SegmentEditorOnePromptLib/__init__.py",
                "SegmentEditorOnePromptLib/SegmentEditorEffect.py", "SegmentEditorOnePromptLib/SegmentEditorEffect.png"}
    for pattern in ("Resources/Icons/*", "Resources/UI/*", "OnePromptSegMRML/*.py"):
        expected |= {os.path.relpath(p, MODULE_DIR).replace(os.sep, "/") for p in glob.glob(os.path.join(MODULE_DIR,
                                                                                                    pattern))}
    missing = sorted(expected - listed)
    assert not missing, f"OnePromptSeg/CMakeLists.txt does not list {missing}"
    sets = _cmake_sets(MODULE_CMAKE)
    weights = set(sets["ONEPROMPTSEG_WEIGHT_FILES"])
    for item in listed:
        base = ROOT if item in weights else MODULE_DIR  # weights are relative to the repository root
        assert os.path.isfile(os.path.join(base, item)), f"OnePromptSeg/CMakeLists.txt lists {item}: no such file"
    assert "${ONEPROMPTSEG_LIB_SCRIPTS}" in sets["MODULE_PYTHON_SCRIPTS"]
    text = _cmake_without_comments(MODULE_CMAKE)
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS.*\)", text, re.S)
    assert re.search(r"if\(BUILD_TESTING\)\s*.*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text,
                     re.S)


def test_module_cmake_ships_the_manifest_and_every_bundled_checkpoint():
    listed = _cmake_listed(MODULE_CMAKE)
    weights = set(_cmake_sets(MODULE_CMAKE)["ONEPROMPTSEG_WEIGHT_FILES"])
    if not os.path.isfile(MANIFEST):
        pytest.skip("no weights_manifest.json yet")
    assert "weights_manifest.json" in weights
    models = json.loads(_read(MANIFEST)).get("models", [])
    bundled = [m["file"] for m in models if os.path.isfile(os.path.join(ROOT, m["file"]))]
    assert bundled, "no checkpoint of the manifest is in the repository: the extension would not work offline"
    missing = [f for f in bundled if f not in weights]
    assert not missing, f"OnePromptSeg/CMakeLists.txt does not ship the bundled checkpoints {missing}"
    default = json.loads(_read(MANIFEST)).get("default")
    default_file = [m["file"] for m in models if m.get("name") == default]
    assert default_file and default_file[0] in listed, "the default checkpoint must ship inside the extension"
    for m in models:
        if m["file"] not in bundled:
            assert m.get("url") and m.get("sha256"), f"{m['name']} is neither bundled nor downloadable with a checksum"


def test_top_level_cmake_follows_the_extension_template():
    sets = _cmake_sets(TOP_CMAKE)
    text = _cmake_without_comments(TOP_CMAKE)
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert sets.get(f"EXTENSION_{field}") and sets[f"EXTENSION_{field}"][0], f"EXTENSION_{field} missing"
    for line in ("cmake_minimum_required(", "project(OnePromptSeg)", "find_package(Slicer REQUIRED)",
                 "include(${Slicer_USE_FILE})", "add_subdirectory(OnePromptSeg)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text, f"top-level CMakeLists.txt lacks {line}"
    for url in sets["EXTENSION_ICONURL"] + sets["EXTENSION_SCREENSHOTURLS"]:
        assert url.startswith(RAW_PREFIX), url
        assert os.path.isfile(os.path.join(ROOT, url[len(RAW_PREFIX):])), f"{url} points to no file of the repo"


def test_extension_index_entry_agrees_with_cmake():
    entry = json.loads(_read(INDEX_JSON))
    sets = _cmake_sets(TOP_CMAKE)
    project = re.search(r"project\((\w+)\)", _read(TOP_CMAKE)).group(1)
    assert os.path.splitext(os.path.basename(INDEX_JSON))[0] == project
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1")
    assert SCHEMA_REQUIRED <= set(entry) <= SCHEMA_PROPERTIES
    assert entry["category"] == sets["EXTENSION_CATEGORY"][0] == "Segmentation"
    depends = [d for d in sets["EXTENSION_DEPENDS"] if d != "NA"]
    assert entry["build_dependencies"] == depends == ["PyTorch"]
    assert entry["scm_url"].rstrip("/").removesuffix(".git") == sets["EXTENSION_HOMEPAGE"][0].rstrip("/")
    assert entry["scm_url"] == "https://github.com/onepromptseg/SlicerOnePromptSeg"
    assert entry.get("scm_revision") == "main" and entry.get("tier") in (1, 3, 5)
    assert all(u.startswith(entry["scm_url"].replace("github.com", "raw.githubusercontent.com"))
               for u in sets["EXTENSION_ICONURL"])


# ------------------------------------------------------------------------------------------------ library, icons

FORBIDDEN = re.compile(r"^\s*(?:import|from)\s+(slicer|qt|vtk|ctk|PythonQt|__main__|SampleData|SegmentEditorEffects"
                       r"|vtkmodules|sitkUtils)\b")


def test_library_never_imports_slicer_qt_vtk_ctk():
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "OnePromptSegLib", "*.py")):
        for n, line in enumerate(_read(path).splitlines(), 1):
            if FORBIDDEN.match(line):
                offenders.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not offenders, "the library must run without Slicer:\n" + "\n".join(offenders)


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_icons_are_128_pixel_pngs():
    for path in (os.path.join(MODULE_DIR, "Resources", "Icons", "OnePromptSeg.png"),
                 os.path.join(ROOT, "Resources", "Icons", "OnePromptSeg.png")):
        assert _png_size(path) == (128, 128), path
    assert _png_size(os.path.join(EFFECT_DIR, "SegmentEditorEffect.png"))[0] >= 21


def test_licence_and_user_docs():
    assert "MIT License" in _read(os.path.join(ROOT, "LICENSE"))
    assert "Copyright (c) 2026 OnePromptSeg contributors" in _read(os.path.join(ROOT, "LICENSE"))
    guide = _read(os.path.join(ROOT, "docs", "README_radiologists.md"))
    assert "Extension" in guide and "not for clinical use" in guide.lower()
    pages = glob.glob(os.path.join(ROOT, "docs", "workflows", "*.md"))
    assert len(pages) >= 5


# ------------------------------------------------------------------------------------------------ Slicer API names

def _api_checker():
    for base in (os.path.join(ROOT, "..", "shared", "tools"), "/work/shared/tools"):
        path = os.path.abspath(os.path.join(base, "slicer_api_check.py"))
        if os.path.isfile(path):
            return path
    return None


def test_slicer_api_check_finds_no_unknown_name():
    checker = _api_checker()
    if checker is None:
        pytest.skip("../shared/tools/slicer_api_check.py is not available on this machine (it ships with the "
                    "project's shared tools, not with the repository)")
    proc = subprocess.run([sys.executable, checker, MODULE_DIR], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"slicer_api_check reported errors:\n{proc.stdout}\n{proc.stderr}"
    assert "0 error(s)" in proc.stdout


def test_device_check_script_runs_its_steps(tmp_path):
    """The prepared GPU check (Testing/device_check.sh) runs here with DEVICE=cpu on a small volume: the script a
    lent machine runs once must not fail on its first real use."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OUT=str(tmp_path), DEVICE="cpu", SHAPE="8,48,48", PYTHON=sys.executable)
    out = subprocess.run(["bash", "Testing/device_check.sh"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    agreement = json.loads((tmp_path / "agreement.json").read_text())
    speed = json.loads((tmp_path / "speed.json").read_text().strip().splitlines()[-1])
    assert agreement["dice_cpu_vs_device"] == 1.0 and speed["slices"] == 7 and len(speed["seconds_runs"]) == 5
    noflow = json.loads((tmp_path / "speed_noflow.json").read_text().strip().splitlines()[-1])
    assert noflow["slices"] == 7 and len(noflow["seconds_runs"]) == 5
