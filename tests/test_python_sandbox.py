"""The Python sandbox: output rules, fresh state, and one adversarial case per protection."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from autotraj.tools import python_sandbox
from autotraj.tools.python_sandbox import PythonSandbox, format_output, run_file, truncate_output
from autotraj.tools.tool import Tool, ToolInfraError

TIMEOUT_S = 1.5
SLACK_S = 1.0  # a call must come back within its timeout plus this


@pytest.fixture(scope="module")
def sandbox():
    with PythonSandbox(workers=2, timeout_s=TIMEOUT_S) as sb:
        yield sb


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


# ---------------------------------------------------------------- output rules


def test_truncation_rule_exact(sandbox):
    call = sandbox.run("print('a' * 300 + 'b' * 300, end='')")
    assert call.output == "a" * 200 + "..." + "b" * 200
    exactly = sandbox.run("print('c' * 400, end='')")
    assert exactly.output == "c" * 400
    assert truncate_output("x" * 401) == "x" * 200 + "..." + "x" * 200


def test_error_format_keeps_printed_output(sandbox):
    call = sandbox.run("print('before')\n1 / 0")
    assert call.status == "error"
    assert call.output == "before\nError: ZeroDivisionError: division by zero"
    assert sandbox.run("raise ValueError()").output == "Error: ValueError"
    assert sandbox.run("def f(:").output.startswith("Error: SyntaxError: ")
    assert format_output("", "NameError: name 'x' is not defined") == (
        "Error: NameError: name 'x' is not defined"
    )


def test_empty_stdout_is_empty_result(sandbox):
    call = sandbox.run("x = 1")
    assert (call.status, call.output, call.tool, call.input) == ("ok", "", "python", "x = 1")
    assert call.latency_s > 0


def test_prelude_available(sandbox):
    call = sandbox.run("print(math.isqrt(17), np.arange(3).sum(), sympy.sqrt(8))")
    assert (call.status, call.output) == ("ok", "4 3 2*sqrt(2)")


def test_fresh_state_between_calls(sandbox):
    assert sandbox.run("secret_global = 42\nnp.pi = 3").status == "ok"
    calls = [sandbox.run("print(secret_global)") for _ in range(3)]  # whichever worker runs it
    assert all("NameError" in c.output for c in calls)
    assert sandbox.run("print(np.pi > 3.1)").output == "True"


def test_invalid_utf8_is_replaced(sandbox):
    call = sandbox.run("import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe')")
    assert call.status == "ok" and call.output == "ok \ufffd\ufffd"


def test_is_a_tool(sandbox):
    assert isinstance(sandbox, Tool) and sandbox.name == "python"


# ---------------------------------------------------------------- one test per protection


def test_timeout_kills_infinite_loop(sandbox):
    call = sandbox.run("print('started', flush=True)\nwhile True: pass")
    assert call.status == "timeout"
    assert call.output.startswith("started\nError: TimeoutError")
    assert TIMEOUT_S <= call.latency_s < TIMEOUT_S + SLACK_S
    assert sandbox.run("print(2)").output == "2"


def test_memory_bomb(sandbox):
    call = sandbox.run("x = bytearray(4 * 1024**3)")
    assert (call.status, call.output) == ("error", "Error: MemoryError")
    call = sandbox.run("a = np.ones(10**9)")  # 8 GB
    assert call.status == "error" and "Unable to allocate" in call.output
    assert sandbox.run("x = bytearray(512 * 1024**2); print(len(x) >> 20)").output == "512"


def test_fork_bomb(sandbox):
    start = time.monotonic()
    call = sandbox.run("import os\nwhile True: os.fork()")
    assert call.status == "error"
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S
    assert sandbox.run("print(3)").output == "3"


def test_file_write_outside_cwd_blocked(sandbox):
    outside = Path(f"/tmp/x_outside_{uuid.uuid4().hex}")
    in_repo = Path(__file__).resolve().parent / f"x_outside_{uuid.uuid4().hex}"
    code = (
        "import os\n"
        f"for path in ({str(outside)!r}, {str(in_repo)!r}, {__file__!r}):\n"
        "    try:\n"
        "        open(path, 'a').write('pwned')\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print('blocked', type(e).__name__)\n"
        "open('inside.txt', 'w').write('fine')\n"
        "print(open('inside.txt').read(), os.listdir('.'))\n"
    )
    before = Path(__file__).read_bytes()
    call = sandbox.run(code)
    assert call.status == "ok", call.output
    assert "wrote" not in call.output and call.output.count("blocked") == 3
    assert "fine ['inside.txt']" in call.output
    assert not outside.exists() and not in_repo.exists()
    assert Path(__file__).read_bytes() == before
    assert sandbox.run("import os; print(os.listdir('.'))").output == "[]"  # throwaway cwd


def test_no_network():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        with PythonSandbox(workers=1, timeout_s=TIMEOUT_S) as sb:
            call = sb.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 1)")
        assert call.status == "error" and "Error:" in call.output
        with pytest.raises(TimeoutError):
            server.accept()


def test_environment_scrubbed(monkeypatch):
    monkeypatch.setenv("AUTOTRAJ_TEST_SECRET", "hunter2-token")
    code = (
        "import os\nprint(sorted(os.environ))\n"
        "print(os.environ.get('AUTOTRAJ_TEST_SECRET'))\n"
        f"print(open('/proc/{os.getpid()}/environ', 'rb').read())\n"
    )
    with PythonSandbox(workers=1, timeout_s=TIMEOUT_S) as sb:
        call = sb.run(code)
    assert "hunter2" not in call.output and "AUTOTRAJ_TEST_SECRET" not in call.output
    assert "None" in call.output


def test_oversized_output_is_capped(sandbox):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call = sandbox.run("print('x' * 10**8)")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert call.status == "ok" and call.output == "x" * 200 + "..." + "x" * 200
    assert grown_mb < 64
    assert call.latency_s < TIMEOUT_S + SLACK_S


@pytest.mark.parametrize(
    "code",
    [
        "import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
        "import os; os._exit(1)",
        "import ctypes; ctypes.string_at(0)",
    ],
    ids=["kill-parent", "exit", "segfault"],
)
def test_snippet_that_kills_its_worker(sandbox, code):
    call = sandbox.run(code)
    assert call.status == "error" and call.output.startswith("Error: ")
    assert [c.output for c in sandbox.run_batch(["print(4)"] * 4)] == ["4"] * 4  # pool recovered


def test_dead_worker_is_replaced():
    with PythonSandbox(workers=1, timeout_s=TIMEOUT_S) as sb:
        worker_pid = sb._pool[0].proc.pid
        threading.Timer(0.3, os.kill, (worker_pid, signal.SIGKILL)).start()
        call = sb.run("import time; time.sleep(1)")
        assert call.status == "error" and "worker died" in call.output
        assert sb.run("print(5)").output == "5"
        assert sb._pool[0].proc.pid != worker_pid


def test_hung_worker_does_not_hang_the_pool():
    with PythonSandbox(workers=1, timeout_s=0.5) as sb:
        worker_pid = sb._pool[0].proc.pid
        threading.Timer(0.1, os.kill, (worker_pid, signal.SIGSTOP)).start()
        start = time.monotonic()
        call = sb.run("import time; time.sleep(0.3)\nprint('done')")
        assert call.status == "timeout"
        assert time.monotonic() - start < 0.5 + python_sandbox._SLACK_S + SLACK_S
        assert sb.run("print(6)").output == "6"


def test_orphaned_children_are_killed(sandbox):
    marker = f"{uuid.uuid4().int % 10**6 + 10**6}.5"
    code = (
        "import os, subprocess, time\n"
        f"subprocess.Popen(['sleep', '{marker}'])\n"
        f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    os.execvp('sleep', ['sleep', '{marker}'])\n"
        "time.sleep(0.2)\n"
        "print('spawned', flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    call = sandbox.run(code)
    assert call.status == "timeout" and call.output.startswith("spawned")
    assert _processes_with(marker) == []
    # ... and when the snippet itself finishes normally
    call = sandbox.run(code.replace("while True: time.sleep(1)", ""))
    assert call.status == "ok"
    assert _processes_with(marker) == []


def test_batch_runs_concurrently():
    with PythonSandbox(workers=4, timeout_s=TIMEOUT_S) as sb:
        sb.run_batch(["pass"] * 4)
        start = time.monotonic()
        calls = sb.run_batch(["import time; time.sleep(0.5); print('z')"] * 8)
        elapsed = time.monotonic() - start
    assert [c.output for c in calls] == ["z"] * 8
    assert elapsed < 1.8, elapsed  # serially: 4 s


def test_concurrent_run_batch_from_threads(sandbox):
    results: dict[int, list[str]] = {}

    def batch(i: int) -> None:
        results[i] = [c.output for c in sandbox.run_batch([f"print({i}, {j})" for j in range(3)])]

    threads = [threading.Thread(target=batch, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {i: [f"{i} {j}" for j in range(3)] for i in range(4)}


# ---------------------------------------------------------------- infrastructure


def test_pool_startup_failure_raises(tmp_path, monkeypatch):
    broken = tmp_path / "broken_worker.py"
    broken.write_text("raise SystemExit('no prelude here')\n")
    monkeypatch.setattr(python_sandbox, "_WORKER_SCRIPT", broken)
    with pytest.raises(ToolInfraError, match="could not start"):
        PythonSandbox(workers=1)


def test_closed_sandbox_raises():
    sb = PythonSandbox(workers=1)
    sb.close()
    sb.close()
    with pytest.raises(ToolInfraError):
        sb.run("print(1)")


def test_run_file(tmp_path):
    path = tmp_path / "snippet.py"
    path.write_text("print(sum(i * i for i in range(10)))\n")
    result = run_file(path, timeout_s=TIMEOUT_S)
    assert set(result) == {"tool", "input", "output", "status", "latency_s"}
    assert (result["tool"], result["output"], result["status"]) == ("python", "285", "ok")
