"""Runs entry points one after another in this one process, as `python ARGS...` would run each (a Python start
per command would cost more than the commands): python tests/run_each.py JSON, JSON a list of argument lists
(["train.py", ...] or ["-m", "t2i.demo", ...]). Prints a JSON list of [exit code, what each wrote on stderr]."""

import contextlib
import io
import json
import runpy
import subprocess
import sys
import traceback
from pathlib import Path


def run_each(*argvs: list, timeout: float = 600) -> list[tuple[int, str]]:
    """Run the commands (argument lists as above) in one Python process: (exit code, stderr) of each."""
    commands = [[str(arg) for arg in argv] for argv in argvs]
    result = subprocess.run([sys.executable, __file__, json.dumps(commands)], cwd=Path(__file__).parents[1],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return [tuple(each) for each in json.loads(result.stdout.splitlines()[-1])]


if __name__ == "__main__":
    said = []
    for argv in json.loads(sys.argv[1]):
        module = argv[0] == "-m"
        sys.argv = argv[1:] if module else list(argv)
        err, code = io.StringIO(), 0
        with contextlib.redirect_stderr(err):
            try:
                if module:
                    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as exit_:  # as Python ends on one: a message goes to stderr, with code 1
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
        said.append([code, err.getvalue()])
    print(json.dumps(said))
