"""The build switch for host debug information (setup.py: ATTENTION_EXT_DEBUG_INFO).

distutils hands Python's own CFLAGS (which carry -g) to the C++ compiler; setup.py appends -g0 after them so that
the host sources compile without debug information (a quarter of their compile time), unless
ATTENTION_EXT_DEBUG_INFO=1. Checked here: the switch's flag logic, read out of setup.py (which cannot be imported:
it runs setup() at import), and the libraries this checkout built, whose ELF sections must hold no DWARF."""
import ast
import glob
import os
import struct

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_functions():
    """env_flag and no_debug_info, compiled from setup.py's own source."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("env_flag", "no_debug_info")]
    assert {n.name for n in wanted} == {"env_flag", "no_debug_info"}, "setup.py lost its debug-information switch"
    scope = {"os": os}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "setup.py", "exec"), scope)
    return scope["no_debug_info"]


@pytest.mark.parametrize("value,flags", [(None, ["-g0"]), ("0", ["-g0"]), ("1", [])])
def test_debug_info_switch(monkeypatch, value, flags):
    if value is None:
        monkeypatch.delenv("ATTENTION_EXT_DEBUG_INFO", raising=False)
    else:
        monkeypatch.setenv("ATTENTION_EXT_DEBUG_INFO", value)
    assert _setup_functions()() == flags


def _section_names(path):
    """The section names of a 64-bit little-endian ELF file."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not a 64-bit little-endian ELF file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    str_off, = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)
    names = []
    for i in range(shnum):
        name_off, = struct.unpack_from("<I", data, shoff + i * shentsize)
        end = data.index(b"\0", str_off + name_off)
        names.append(data[str_off + name_off:end].decode())
    return names


def test_built_libraries_carry_no_debug_information():
    """The extension's libraries as this checkout built them: sections, but no .debug_* ones (the build ran without
    ATTENTION_EXT_DEBUG_INFO=1, as CI's does)."""
    if os.environ.get("ATTENTION_EXT_DEBUG_INFO") == "1":
        pytest.skip("ATTENTION_EXT_DEBUG_INFO=1: this build keeps debug information on purpose")
    libs = sorted(glob.glob(os.path.join(ROOT, "attention_ext", "_C*.so")))
    if not libs:
        pytest.skip("no library built in place in this checkout (attention_ext/_C*.so)")
    for lib in libs:
        names = _section_names(lib)
        assert ".text" in names, (lib, names)
        debug = [n for n in names if n.startswith(".debug_")]
        assert not debug, f"{os.path.basename(lib)} holds debug sections {debug}: was -g0 dropped from setup.py?"
