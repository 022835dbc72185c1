"""What can be checked about the Slicer modules without Slicer: API names, .ui files, Python 3.9, layering, and the
Qt-free engine set-up (dependency check, install arguments) against real interpreters."""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODULES = ("MedDLSegment", "MedDLClassify")
sys.path.insert(0, str(REPO / "MedDLSegment"))


def _module_python_files():
    for module in MODULES:
        yield from sorted((REPO / module).rglob("*.py"))


def _ui_path(module: str) -> Path:
    return REPO / module / "Resources" / "UI" / f"{module}.ui"


def test_slicer_api_checker_passes():
    checker = SHARED / "slicer" / "check_slicer_api.py"
    if not checker.is_file():
        pytest.fail(f"{checker} not found: the shared folder must lie beside the repository (../shared)")
    completed = subprocess.run(
        [sys.executable, str(checker), *MODULES], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert " 0 failed" in completed.stdout


def _ui_names(module: str) -> set:
    """Object names of every widget QUiLoader builds from the module's .ui (Slicer's own widgets fall back to the
    base class the file declares)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QFile, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QWidget

    QApplication.instance() or QApplication([])
    loader = QUiLoader()
    handle = QFile(str(_ui_path(module)))
    assert handle.open(QIODevice.ReadOnly), f"cannot open {_ui_path(module)}"
    try:
        widget = loader.load(handle)
    finally:
        handle.close()
    assert widget is not None, f"{_ui_path(module)}: QUiLoader failed: {loader.errorString()}"
    names = {child.objectName() for child in widget.findChildren(QWidget)} | {widget.objectName()}
    widget.deleteLater()
    return names


def _ui_names_used_in_code(path: Path) -> set:
    """Every ``self.ui.<name>`` the module's code touches."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    used = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            used.add(node.attr)
    return used


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_the_code_uses_exists_in_the_ui(module):
    used = _ui_names_used_in_code(REPO / module / f"{module}.py")
    assert len(used) >= 10, f"{module}.py uses only {sorted(used)} from self.ui: is the parser looking?"
    missing = sorted(used - _ui_names(module))
    assert not missing, f"{module}.py uses self.ui.{missing} which {_ui_path(module).name} does not define"


@pytest.mark.parametrize("module", MODULES)
def test_ui_parameter_bindings_and_custom_widgets_are_real(module):
    """Every SlicerParameterName names a field of the module's @parameterNodeWrapper class (connectGui would
    silently skip a typo), and every custom widget class is one Slicer or CTK has."""
    tree = ast.parse((REPO / module / f"{module}.py").read_text(encoding="utf-8"))
    wrapped = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        and any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list)
    ]
    assert len(wrapped) == 1, f"{module}.py must define one @parameterNodeWrapper class"
    fields = {n.target.id for n in wrapped[0].body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    root = ET.parse(_ui_path(module)).getroot()
    bound = {prop.findtext("string") for prop in root.iter("property") if prop.get("name") == "SlicerParameterName"}
    assert bound, f"{_ui_path(module).name} binds no widget to the parameter node"
    assert bound <= fields, f"{_ui_path(module).name} binds {sorted(bound - fields)}, not fields of {wrapped[0].name}"

    known = json.loads((SHARED / "slicer" / "slicer_api_names.json").read_text(encoding="utf-8"))
    slicer_classes = set(known["ctk"]) | set(known["slicer_qt"])
    for custom in root.iter("customwidget"):
        name = custom.findtext("class")
        assert name in slicer_classes, f"{_ui_path(module).name}: custom widget {name} is not a Slicer/CTK class"


_RUNTIME_ANNOTATION_PROBLEMS = ("list", "dict", "tuple", "set", "type")


def _annotation_problems(tree: ast.AST) -> list:
    """Annotations Python 3.9 evaluates and rejects: ``X | Y`` and ``list[int]``-style builtin generics."""
    problems = []
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.args + node.args.kwonlyargs + node.args.posonlyargs
            annotations += [a.annotation for a in arguments if a.annotation is not None]
            annotations += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            for part in ast.walk(annotation):
                if isinstance(part, ast.BinOp) and isinstance(part.op, ast.BitOr):
                    problems.append(f"line {part.lineno}: X | Y annotation")
                if (
                    isinstance(part, ast.Subscript)
                    and isinstance(part.value, ast.Name)
                    and part.value.id in _RUNTIME_ANNOTATION_PROBLEMS
                ):
                    problems.append(f"line {part.lineno}: {part.value.id}[...] annotation")
    return problems


def _has_future_annotations(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(a.name == "annotations" for a in node.names)
        for node in tree.body
    )


@pytest.mark.parametrize("path", list(_module_python_files()), ids=lambda p: str(p.relative_to(REPO)))
def test_module_code_runs_on_slicer_5_8_python_3_9(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    if not _has_future_annotations(tree):
        assert not _annotation_problems(tree), f"{path.name}: {_annotation_problems(tree)} fail on Python 3.9"


def test_gui_side_code_never_loads_torch_monai_simpleitk_or_qt(tmp_path):
    """Import every Qt-free module and read a model card in a fresh interpreter: the heavy engine stays out of
    Slicer's GUI process."""
    package = tmp_path / "model"
    package.mkdir()
    (package / "model.json").write_text(
        json.dumps(
            {
                "format": "meddl-model",
                "schema_version": 1,
                "name": "m",
                "task": "segmentation",
                "architecture": {"name": "UNet", "args": {"out_channels": 2}},
                "labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "brain"}],
                "input": {"patch_size": [8, 8, 8]},
            }
        )
    )
    script = f"""
import sys, json
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "MedDLSegment")!r}]
from MedDLSegmentLib import batch, engine, geometry, models, nodes, session
import meddl.client, meddl.protocol
labels = [lb.name for lb in models.read_model({str(package)!r}).labels]
heavy = sorted(m for m in ("torch", "monai", "SimpleITK", "qt", "PySide6", "ctk") if m in sys.modules)
engine_files = sorted(m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "meddl")
print(json.dumps({{"labels": labels, "heavy": heavy, "engine_files": engine_files}}))
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["labels"] == ["background", "brain"]
    assert report["heavy"] == []
    # The engine modules Slicer's GUI process loads must run on Slicer 5.8's Python 3.9 as well.
    assert any(f.endswith("client.py") for f in report["engine_files"])
    for path in map(Path, report["engine_files"]):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))
        if not _has_future_annotations(tree):
            assert not _annotation_problems(tree), f"{path}: {_annotation_problems(tree)} fail on Python 3.9"


def test_engine_requirements_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    from MedDLSegmentLib.engine import ENGINE_REQUIREMENTS

    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    declared = {d.replace(" ", "") for d in declared if not d.lower().startswith("numpy")}
    assert set(ENGINE_REQUIREMENTS.values()) == declared, "MedDLSegmentLib.engine.ENGINE_REQUIREMENTS is out of date"


def test_dependency_check_asks_the_real_interpreters():
    from MedDLSegmentLib import engine

    here = engine.check_dependencies(sys.executable, REPO)
    assert here["modules"]["meddl"] and here["modules"]["torch"] and here["modules"]["monai"]
    assert engine.missing_requirements(here) == []

    bare = Path("/usr/bin/python3")
    if not bare.is_file():
        pytest.skip("no system Python without torch to compare with")
    report = engine.check_dependencies(str(bare), REPO)
    assert report["modules"]["meddl"], "the engine root must be on the worker's PYTHONPATH"
    if report["modules"]["torch"] is None:
        assert "torch>=2.2" in engine.missing_requirements(report)

    with pytest.raises(RuntimeError, match="no-such-python"):
        engine.check_dependencies("/no-such-python", REPO)


def test_install_keeps_numpy_and_says_what_to_do_offline(tmp_path):
    from MedDLSegmentLib import engine, session

    work = session.EngineSession(REPO / "MedDLSegment", python=sys.executable)
    calls = []
    with pytest.raises(RuntimeError, match='(?s)Cannot reach pypi.org.*pip install "monai>=1.4"'):
        work.install_dependencies(["monai>=1.4"], calls.append, "2.0.2", online=lambda: False)
    assert calls == [], "nothing may be installed offline"

    torch_installs = []
    # The interpreter already has everything, so the re-check after "installing" finds nothing missing.
    work.install_dependencies(
        ["torch>=2.2", "monai>=1.4"],
        calls.append,
        "2.0.2",
        install_torch=lambda: torch_installs.append(1),
        online=lambda: True,
    )
    assert torch_installs == [1], "torch goes through PyTorch Utils when it is there"
    (arguments,) = calls
    assert arguments[0] == "monai>=1.4" and "torch>=2.2" not in arguments
    constraint = Path(arguments[arguments.index("-c") + 1])
    assert constraint.read_text() == "numpy==2.0.2\n"
    assert engine.pip_install_arguments(["scipy"], None, tmp_path / "c.txt") == ["scipy"]


def test_python_version_gate_and_worker_interpreter(tmp_path, monkeypatch):
    from MedDLSegmentLib import engine

    assert engine.python_too_old((3, 12)) is None
    message = engine.python_too_old((3, 9))
    assert "3.10" in message and "Slicer 5.10" in message and "3.9" in message

    fake = tmp_path / "bin" / "PythonSlicer"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert engine.worker_python() == str(fake)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert engine.worker_python("/opt/Slicer/bin/python-real") == "/opt/Slicer/bin/python-real"
    with pytest.raises(FileNotFoundError, match="PythonSlicer"):
        engine.worker_python("/opt/Slicer/bin/SlicerApp-real")
    env = engine.worker_environment(REPO, base={"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/x"]


def test_model_discovery_skips_broken_packages_and_resolves_homes(tmp_path):
    from MedDLSegmentLib import models

    def card(folder: Path, name: str, task: str = "segmentation") -> None:
        folder.mkdir(parents=True)
        labels = [{"value": 0, "name": "background"}, {"value": 1, "name": "brain", "color": [1, 0, 0]}]
        data = {
            "format": "meddl-model",
            "schema_version": 1,
            "name": name,
            "version": "1",
            "task": task,
            "architecture": {"name": "UNet", "args": {}},
            "labels": labels,
            "input": {"patch_size": [8, 8, 8]},
        }
        (folder / "model.json").write_text(json.dumps(data))

    card(tmp_path / "a-seg", "seg")
    card(tmp_path / "b-cls", "cls", task="classification")
    card(tmp_path / "home" / "versions" / "0001", "homed")
    card(tmp_path / "home" / "versions" / "0002", "homed-v2")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{ not json")
    found = models.discover_models([tmp_path, tmp_path / "missing"], task="segmentation")
    assert [(m.name, m.path.name) for m in found] == [("seg", "a-seg"), ("homed-v2", "home")]
    assert [m.name for m in models.discover_models([tmp_path / "b-cls"])] == ["cls"]
    assert models.read_model(tmp_path / "a-seg").labels[1].color == [1.0, 0.0, 0.0]
    from meddl.errors import ModelError

    with pytest.raises(ModelError, match="not a model package"):
        models.read_model(tmp_path)


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_every_python_file_and_resource(module):
    """slicerMacroBuildScriptedModule copies only what it is given: a file missing from SCRIPTS/RESOURCES works from
    the source tree and breaks in the built extension."""
    folder = REPO / module
    cmake = (folder / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", module)
    listed = {line.strip() for line in cmake.splitlines()}
    python_files = {p.relative_to(folder).as_posix() for p in folder.rglob("*.py") if "Testing" not in p.parts}
    resources = {p.relative_to(folder).as_posix() for p in (folder / "Resources").rglob("*") if p.is_file()}
    missing = sorted((python_files | resources) - listed)
    assert not missing, f"{module}/CMakeLists.txt does not list {missing}"


# Stand-in for Slicer's CMake package (Slicer cannot be installed here): the macro checks its arguments as the real
# slicerMacroBuildScriptedModule does (only NAME/SCRIPTS/RESOURCES/WITH_GENERIC_TESTS/WITH_SUBDIR, listed files must
# exist) and copies the files where ctkMacroCompilePythonScript puts them, beside each other in qt-scripted-modules.
_SLICER_CMAKE_STUB = """
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(BUILD_TESTING ON)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS OR NOT MY_NAME)
    message(FATAL_ERROR "slicerMacroBuildScriptedModule: bad arguments ${MY_UNPARSED_ARGUMENTS}")
  endif()
  foreach(file IN LISTS MY_SCRIPTS MY_RESOURCES)
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${file})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule: ${file} does not exist")
    endif()
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${file} ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${file}
                   COPYONLY)
  endforeach()
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(TEST "" "SCRIPT" "" ${ARGN})
  if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${TEST_SCRIPT})
    message(FATAL_ERROR "slicer_add_python_unittest: ${TEST_SCRIPT} does not exist")
  endif()
endmacro()
"""


def test_extension_configures_and_lays_out_a_working_module_folder(tmp_path):
    """Configure the extension's CMake (Slicer's macros stubbed), then check that the built scripted-modules folder
    holds both modules, the Qt-free lib and the engine side by side, and that the lib finds the engine there."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed (apt-get install cmake)")
    stub = tmp_path / "slicer-stub"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(_SLICER_CMAKE_STUB)
    (stub / "empty.cmake").write_text("")
    build = tmp_path / "build"
    completed = subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={stub}"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    modules = build / "lib" / "Slicer-5.10" / "qt-scripted-modules"
    for relative in (
        "MedDLSegment.py",
        "MedDLClassify.py",
        "MedDLSegmentLib/nodes.py",
        "MedDLSegmentLib/jobs.py",
        "Resources/UI/MedDLSegment.ui",
        "Resources/UI/MedDLClassify.ui",
        "meddl/__init__.py",
        "meddl/client.py",
        "meddl/worker/__main__.py",
    ):
        assert (modules / relative).is_file(), f"the built extension lacks {relative}"
    script = f"""
import sys
sys.path[:0] = [{str(modules)!r}]
from MedDLSegmentLib import engine, models
import meddl
assert meddl.__file__.startswith({str(modules)!r}), meddl.__file__
print(engine.find_engine_root({str(modules)!r}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == modules.resolve()
