"""The shape rules of ddp_hooks/: no module over 300 lines, no function over 60 lines, no call
with more than 6 positional arguments. Prints every violation; exits 1 if there is one."""

import ast
import sys
from pathlib import Path

MAX_FILE, MAX_FUNCTION, MAX_POSITIONAL = 300, 60, 6


def violations(path: Path) -> list[str]:
    text = path.read_text()
    out = []
    lines = text.count("\n") + 1
    if lines > MAX_FILE:
        out.append(f"{path}: {lines} lines (at most {MAX_FILE})")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION:
                out.append(f"{path}:{node.lineno}: {node.name} is {length} lines (at most {MAX_FUNCTION})")
        elif isinstance(node, ast.Call):
            positional = [a for a in node.args if not isinstance(a, ast.Starred)]
            if len(positional) > MAX_POSITIONAL:
                out.append(f"{path}:{node.lineno}: a call with {len(positional)} positional arguments")
    return out


def main() -> int:
    root = Path(__file__).resolve().parent.parent / "ddp_hooks"
    found = [v for path in sorted(root.rglob("*.py")) for v in violations(path)]
    print("\n".join(found) if found else "structure: ok")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
