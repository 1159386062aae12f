"""Where code sent by value came from: the client remembers the code it pickles by value, and puts the
real file names and source lines back into tracebacks that workers send about it.

Runs in the client: user threads (remember_code, as they pickle calls) and the I/O thread or a reading
caller (locate_sent_code, as errors arrive). The record is a module-level dict read and written
without a lock: under the GIL, a race loses at most one remembered code object.
"""

from __future__ import annotations

import linecache
import re
import types
from typing import Any, Optional

# cloudpickle rebuilds a function sent by value with the file name "<dynamic-code>", so a traceback
# from a worker shows no file and no source line for it. The client remembers the code it sent by
# value (by name, with nested code and the same module's functions it calls) to put them back.
_sent_code: dict[str, dict[int, types.CodeType]] = {}
_sent_code_count = 0
SENT_CODE_LIMIT = 4096

_DYNAMIC_FRAME = re.compile(r'^( *)File "<dynamic-code>", line (\d+), in (.+)$')


def remember_code(fn: Any) -> None:
    global _sent_code_count
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType) or id(code) in _sent_code.get(code.co_name, {}):
        return
    if _sent_code_count >= SENT_CODE_LIMIT:
        _sent_code.clear()
        _sent_code_count = 0
    seen: set[int] = set()
    functions = [fn]
    while functions:
        function = functions.pop()
        codes = [function.__code__]
        while codes:
            code = codes.pop()
            if id(code) in seen:
                continue
            seen.add(id(code))
            _sent_code.setdefault(code.co_name, {})[id(code)] = code
            _sent_code_count += 1
            codes.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
            for name in code.co_names:
                used = getattr(function, "__globals__", {}).get(name)
                if isinstance(used, types.FunctionType) and used.__module__ == fn.__module__ \
                        and id(used.__code__) not in seen:
                    functions.append(used)


def locate_sent_code(text: str) -> str:
    """A remote traceback with the real file, and the source line where this process has it, for
    every frame of code this process sent by value."""
    if "<dynamic-code>" not in text:
        return text
    lines = []
    for line in text.split("\n"):
        match = _DYNAMIC_FRAME.match(line)
        code = _sent_code_at(match.group(3), int(match.group(2))) if match else None
        if match is None or code is None:
            lines.append(line)
            continue
        indent, lineno, name = match.group(1), int(match.group(2)), match.group(3)
        lines.append(f'{indent}File "{code.co_filename}", line {lineno}, in {name}')
        source = linecache.getline(code.co_filename, lineno).strip()
        if source:
            lines.append(f"{indent}  {source}")
    return "\n".join(lines)


def _sent_code_at(name: str, lineno: int) -> Optional[types.CodeType]:
    best, best_span = None, None
    for code in list(_sent_code.get(name, {}).values()):
        numbers = [line for _, _, line in code.co_lines() if line is not None]
        if numbers and min(numbers) <= lineno <= max(numbers):
            span = max(numbers) - min(numbers)
            if best_span is None or span < best_span:
                best, best_span = code, span
    return best
