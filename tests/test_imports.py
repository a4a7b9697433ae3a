import subprocess
import sys

import pytest


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_import_terrace_loads_no_backend():
    result = run_python(
        "import sys, terrace\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'flax')))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_top_level_torch_names_load_lazily():
    result = run_python(
        "import sys, terrace as ter\n"
        "assert 'torch' not in sys.modules\n"
        "print(ter.LazyLinear.__module__, 'torch' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["terrace.torch._lazy", "True"]


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [("terrace.torch", "torch", "torch"), ("terrace.flax", "flax", "flax")],
)
def test_missing_backend_names_extra(module, blocked, extra):
    result = run_python(
        f"import sys\nsys.modules[{blocked!r}] = None\n"
        "import terrace\n"
        "try:\n"
        f"    import {module}\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, isinstance(error, terrace.TerraceError))\n"
        "    print(error)\n"
    )
    assert result.returncode == 0, result.stderr
    first, message = result.stdout.split("\n", 1)
    assert first == "BackendNotInstalledError True"
    assert f"pip install 'terrace[{extra}]'" in message


def test_missing_torch_via_top_level_attribute():
    result = run_python(
        "import sys\nsys.modules['torch'] = None\nimport terrace\n"
        "try:\n    terrace.Module\nexcept ImportError as error:\n    print(error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'terrace[torch]'" in result.stdout


def test_unknown_attribute_raises_attribute_error():
    import terrace

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        terrace.Nope
