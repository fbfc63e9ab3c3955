"""Run llama-cpp-python's own OpenAI-compatible server with llama.cpp's extra buffer types off.

The same AMX-safe load setting parlour uses (see parlour/backends/llama.py); the
server itself has no option for it. Arguments are passed to `llama_cpp.server`.
"""

from __future__ import annotations

import runpy
import sys

from parlour.backends.llama import _without_extra_buffer_types

if __name__ == "__main__":
    sys.argv[0] = "llama_cpp.server"
    with _without_extra_buffer_types():
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
