"""Hostile snippets against the Python sandbox: each must fail as data, quickly, and leave the
pool serving the next call. One row per attack; the protection that stops it is named in the row.

The host-side effects (files outside the throwaway directory, processes left behind, other
processes signalled) are checked by the host, not by trusting the snippet's output.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from autotraj.tools.python_sandbox import PythonSandbox

TIMEOUT_S = 1.5
SLACK_S = 1.5  # a call must come back within its timeout plus this


@pytest.fixture(scope="module")
def sandbox():
    with PythonSandbox(workers=2, timeout_s=TIMEOUT_S) as sb:
        yield sb


def ok(status: str) -> bool:
    return status == "ok"


# (id, snippet, expected status, a fragment the output must contain, protection)
ATTACKS = [
    # --- filesystem -------------------------------------------------------------------------
    (
        "write-etc",
        "open('/etc/autotraj_pwned', 'w')",
        "error",
        "No such file",
        "private root: the host's /etc is not in it",
    ),
    (
        "write-home",
        "open('/root/.bashrc', 'a').write('x')",
        "error",
        "Read-only file system",
        "private root, read-only",
    ),
    (
        "read-shadow",
        "print(open('/etc/shadow').read()[:10])",
        "error",
        "No such file",
        "private root (and the unprivileged uid could not read it anyway)",
    ),
    (
        "chmod-system-file",
        "import os; os.chmod('/usr/bin/env', 0o777)",
        "error",
        "Error:",
        "unprivileged uid + read-only root",
    ),
    (
        "disk-fill",
        "f = open('big', 'wb')\nwhile True: f.write(b'x' * (1 << 20))",
        "error",
        "Error:",
        "RLIMIT_FSIZE and a 64 MiB tmpfs",
    ),
    (
        "write-proc-sys",
        "open('/proc/sys/kernel/hostname', 'w').write('pwned')",
        "error",
        "Error:",
        "unprivileged uid",
    ),
    # --- privileges and other processes -----------------------------------------------------
    ("setuid-root", "import os; os.setuid(0)", "error", "PermissionError", "unprivileged uid"),
    (
        "kill-parent",
        "import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
        "error",
        "PermissionError",
        "unprivileged uid (the worker runs as another uid)",
    ),
    (
        "kill-everyone",
        "import os, signal; os.kill(-1, signal.SIGKILL); print('still here')",
        "ok",
        "still here",
        "unprivileged uid: kill(-1) reaches no other process (the pool check below)",
    ),
    (
        "ptrace-parent",
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "r = libc.ptrace(16, os.getppid(), 0, 0)\n"  # PTRACE_ATTACH
        "print('ptrace', r, ctypes.get_errno())",
        "ok",
        "ptrace -1 1",  # EPERM
        "unprivileged uid",
    ),
    (
        "unshare-user",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('unshare', libc.unshare(0x10000000 | 0x00020000), ctypes.get_errno())",
        "ok",
        "unshare -1",
        "RLIMIT/uid: no new namespaces to remount the root",
    ),
    (
        "mount-tmpfs",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('mount', libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), ctypes.get_errno())",
        "ok",
        "mount -1 1",
        "unprivileged uid",
    ),
    # --- network ----------------------------------------------------------------------------
    (
        "dns",
        "import socket; socket.getaddrinfo('pypi.org', 443)",
        "error",
        "Error:",
        "network namespace without interfaces",
    ),
    (
        "udp-out",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.sendto(b'x', ('8.8.8.8', 53))",
        "error",
        "Error:",
        "network namespace",
    ),
    (
        "ipv6-loopback",
        "import socket; socket.create_connection(('::1', 22), 1)",
        "error",
        "Error:",
        "network namespace",
    ),
    # --- resources --------------------------------------------------------------------------
    (
        "fd-exhaustion",
        "fs = [open('/dev/null') for _ in range(100000)]",
        "error",
        "Too many open files",
        "RLIMIT_NOFILE (256)",
    ),
    (
        "thread-bomb",
        "import threading, time\nn = 0\ntry:\n    while True:\n"
        "        threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()\n"
        "        n += 1\nexcept RuntimeError as e:\n    print(n < 64, e)",
        "ok",
        "True can't start new thread",
        "RLIMIT_NPROC",
    ),
    (
        "ten-billion-char-string",
        "s = 'x' * 10**10\nprint(s)",
        "error",
        "MemoryError",
        "RLIMIT_AS",
    ),
    (
        "recursion",
        "def f(): return f()\nf()",
        "error",
        "RecursionError",
        "interpreter limit, reported as data",
    ),
    (
        "shell-out",
        "import subprocess\n"
        "r = subprocess.run(['cat', '/etc/hostname', '/proc/1/environ'], capture_output=True)\n"
        "print(r.returncode, r.stdout)",
        "ok",
        "1 b''",
        "private root + unprivileged uid hold for child programs too",
    ),
    (
        "segfault",
        "import ctypes; ctypes.string_at(0)",
        "error",
        "Error:",
        "child crash reported as an error",
    ),
    (
        "sleep-past-timeout",
        "import time; time.sleep(60)",
        "timeout",
        "TimeoutError",
        "wall-clock limit from the worker",
    ),
    (
        "ignore-sigterm",
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass",
        "timeout",
        "TimeoutError",
        "SIGKILL of the process group",
    ),
    (
        "cpu-in-c",
        "import sympy\nsympy.factorint(2**401 - 1)",
        "timeout",
        "TimeoutError",
        "wall-clock limit (the loop is in C, no Python signal handler runs)",
    ),
    # --- output -----------------------------------------------------------------------------
    (
        "output-flood",
        "while True: print('y' * 1000)",
        "timeout",
        "...",
        "stdout capped (first and last MiB) and truncated 200+...+200",
    ),
    (
        "huge-exception",
        "raise ValueError('z' * 10**7)",
        "error",
        "...",
        "error text truncated like output",
    ),
    (
        "no-newline-10mb",
        "import sys; sys.stdout.write('a' * 10**7)",
        "ok",
        "...",
        "truncation",
    ),
    ("close-stdout", "import os; os.close(1); print('x')", "error", "Error:", "reported as data"),
    ("read-stdin", "print(input())", "error", "EOFError", "stdin is empty, never a hang"),
    ("exit-silently", "import os; os._exit(0)", "ok", "", "an empty result"),
    ("sys-exit-code", "import sys; sys.exit(3)", "error", "SystemExit", "reported as data"),
]


@pytest.mark.parametrize(
    ("code", "status", "fragment"),
    [pytest.param(code, status, fragment, id=name) for name, code, status, fragment, _ in ATTACKS],
)
def test_attack_fails_as_data_and_the_pool_survives(sandbox, code, status, fragment):
    start = time.monotonic()
    call = sandbox.run(code)
    assert call.status == status, call.output
    assert fragment in call.output
    if fragment == "":  # the row expects no output at all, not merely any output
        assert call.output == ""
    assert len(call.output) <= 400 + 3  # the release's 200 + "..." + 200
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S
    assert sandbox.run("print(1)").output == "1"


def test_attacks_are_distinct():
    assert len(ATTACKS) >= 30
    assert len({name for name, *_ in ATTACKS}) == len(ATTACKS)
    assert len({code for _, code, *_ in ATTACKS}) == len(ATTACKS)


def test_loopback_server_is_unreachable(sandbox):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        call = sandbox.run(
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), 1)\n"
            "s.sendall(b'stolen')"
        )
        assert call.status == "error"
        with pytest.raises(TimeoutError):
            server.accept()


def test_signal_to_a_host_process_is_refused(sandbox):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        call = sandbox.run(f"import os, signal; os.kill({victim.pid}, signal.SIGKILL)")
        assert call.status == "error" and "PermissionError" in call.output
        time.sleep(0.1)
        assert victim.poll() is None  # still alive
    finally:
        victim.kill()
        victim.wait()


def test_host_files_are_untouched(sandbox, tmp_path):
    target = tmp_path / f"victim_{uuid.uuid4().hex}.txt"
    target.write_text("original")
    os.chmod(tmp_path, 0o777)
    os.chmod(target, 0o666)  # writable by anyone: only the read-only mount can stop the write
    call = sandbox.run(
        f"open({str(target)!r}, 'w').write('pwned')\nimport os; os.remove({str(target)!r})"
    )
    assert call.status == "error"
    assert target.read_text() == "original"


def test_disk_fill_leaves_no_file_behind():
    """The host cannot see the per-call directory (it is on the worker's private tmpfs), so the
    next call on the same worker looks: the old directory is gone and the 64 MiB tmpfs is free."""
    with PythonSandbox(workers=1, timeout_s=TIMEOUT_S) as sb:
        call = sb.run(
            "import os\nprint(os.getcwd(), flush=True)\n"
            "f = open('big', 'wb')\nwhile True: f.write(b'x' * (1 << 20))"
        )
        assert call.status == "error"
        cwd = call.output.splitlines()[0]
        assert not Path(cwd).exists() or not any(Path(cwd).iterdir())  # nothing on the host
        after = sb.run(
            f"import os; s = os.statvfs('.'); print(os.path.exists({cwd!r}), "
            "s.f_bfree * s.f_frsize >> 20, s.f_blocks * s.f_frsize >> 20)"
        )
    assert after.status == "ok", after.output
    assert after.output == "False 64 64"  # (old directory exists, free MiB, size MiB)


def test_project_run_dir_and_home_are_invisible(sandbox, tmp_path):
    """Reads, not only writes: the project's files, a run directory, /etc and home directories
    are not in the snippet's root at all."""
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / "secret.txt").write_text("token")
    os.chmod(tmp_path, 0o755)
    targets = [__file__, str(run_dir / "secret.txt"), "/etc/passwd"]
    home = Path.home()
    code = (
        "import os\n"
        f"for p in {targets!r}:\n"
        "    print(p, os.path.exists(p))\n"
        f"print(sorted(os.listdir({str(home)!r})) if os.path.isdir({str(home)!r}) else [])\n"
        "print(sorted(os.listdir('/')))\n"
    )
    call = sandbox.run(code)
    assert call.status == "ok", call.output
    lines = call.output.splitlines()
    assert all(line.endswith("False") for line in lines[: len(targets)]), call.output
    # the home directory holds at most the way to the interpreter (e.g. ~/.pyenv)
    interpreter = {sys.base_prefix, sys.prefix}
    way_in = {
        Path(p).relative_to(home).parts[0] for p in interpreter if Path(p).is_relative_to(home)
    }
    assert set(eval(lines[-2])) <= way_in, call.output
    top = eval(lines[-1])  # the snippet's own listing of /
    assert "etc" not in top and "home" not in top
    assert sandbox.isolation.split()[1] == "filesystem=private-root"
