"""Every example in README.rst and in the documentation (docs/*.rst), run.

Each code block there is preceded by a ``.. test: HOW`` comment naming how it is run here; a block
without one (other than ``text`` output) fails the first test, so no example goes unchecked. The
documentation builds with Sphinx, warnings as errors.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import ROOT, alive, children_of, free_port, wait_until

from zmqexecutor import ZMQExecutor

README = ROOT / "README.rst"
# The README and every page of the documentation: what the tests below read as "the docs".
PAGES = [README, *sorted((ROOT / "docs").glob("*.rst"))]


def _all_text() -> str:
    return "\n".join(page.read_text() for page in PAGES)
RUN = "python"
RUN_WITH_WORKERS = "python, with a worker at each tcp://127.0.0.1 endpoint"
TAGS = {
    RUN, RUN_WITH_WORKERS, "two-commands", "the command-line synopsis", "systemd unit", "dockerfile",
    "docker run", "walk-through, on the client", "walk-through, on the worker", "walk-through, client.py",
    "walk-through, on the client again", "ssh example", "slurm example", "kubernetes manifest",
    "memory limits example", "resources example",
}


class Block(NamedTuple):
    tag: str | None
    language: str
    text: str
    line: str  # page:line


def _blocks() -> list[Block]:
    found = []
    for page in PAGES:
        found += _blocks_of(page)
    return found


def _blocks_of(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found = []
    for number, line in enumerate(lines):
        directive = re.match(r"(\s*)\.\. code-block:: (\S+)\s*$", line)
        if not directive:
            continue
        indent = len(directive.group(1))
        previous = [text for text in lines[:number] if text.strip()]
        comment = re.match(r"\s*\.\. test: (.+)$", previous[-1]) if previous else None
        body = []
        for text in lines[number + 1:]:
            if text.strip() and len(text) - len(text.lstrip()) <= indent:
                break
            body.append(text)
        found.append(Block(comment.group(1).strip() if comment else None, directive.group(2),
                           textwrap.dedent("\n".join(body)).strip() + "\n", f"{page.name}:{number + 1}"))
    return found


BLOCKS = _blocks()


def _only(tag: str) -> Block:
    (block,) = [b for b in BLOCKS if b.tag == tag]
    return block


def test_every_code_block_says_how_it_is_tested() -> None:
    assert len(BLOCKS) > 10
    untested = [b.line for b in BLOCKS if b.tag is None and b.language != "text"]
    assert not untested, f"code blocks without a '.. test:' comment: {untested}"
    unknown = [f"{b.line}: {b.tag}" for b in BLOCKS if b.tag is not None and b.tag not in TAGS]
    assert not unknown, f"README code blocks tagged with no known test: {unknown}"


def test_every_file_the_readme_names_is_in_the_repository() -> None:
    """Images and files the README points at must be tracked: on a clone or a package page, an
    ignored or uncommitted file is a broken link."""
    named: set[str] = set()
    for page in PAGES:
        text = page.read_text()
        # Images are named from the page's own folder; files in ``...`` from the repository's root.
        named |= {os.path.relpath(os.path.normpath(page.parent / image), ROOT)
                  for image in re.findall(r"^\.\. (?:image|figure):: (\S+)", text, re.M)}
        named |= {p for p in re.findall(r"``([\w./-]+\.(?:md|png|json|rst|py|cfg|toml))``", text) if "/" in p}
    assert named, "expected the README to name some files"
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    assert sorted(named - tracked) == []


def test_the_api_reference_names_every_public_name_and_option() -> None:
    import inspect

    import zmqexecutor

    text = _all_text()
    missing = [name for name in zmqexecutor.__all__ if f"``{name}``" not in text]
    assert not missing, f"public names the README does not document: {missing}"
    signature = inspect.signature(ZMQExecutor)
    options = [name for name in signature.parameters if not re.search(rf"``{name}\b", text)]
    assert not options, f"ZMQExecutor options the README does not document: {options}"
    for method in ("submit", "map", "shutdown", "terminate_workers", "kill_workers", "workers", "endpoints"):
        assert f"``{method}" in text, method


def _run_example(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> str:
    script = tmp_path / "example.py"
    script.write_text(text)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=100, env=env)
    assert done.returncode == 0, f"{text}\n--- stdout:\n{done.stdout}\n--- stderr:\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.tag == RUN], ids=lambda b: b.line)
def test_python_example_runs(block: Block, tmp_path: Path) -> None:
    _run_example(block.text, tmp_path)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.tag == RUN_WITH_WORKERS], ids=lambda b: b.line)
def test_python_example_runs_against_real_workers(block: Block, tmp_path: Path, start_worker) -> None:
    text = block.text
    ports = sorted(set(re.findall(r"tcp://127\.0\.0\.1:(\d+)", text)))
    assert ports
    for port in ports:
        # The README's fixed ports may be taken on a shared machine: each gets a worker on a free one.
        text = text.replace(f"tcp://127.0.0.1:{port}", start_worker().endpoint)
    _run_example(text, tmp_path)


def test_the_resources_example_runs_needy_tasks_only_where_they_are_offered(tmp_path: Path, start_worker) -> None:
    text = _only("resources example").text
    gpu = start_worker(extra=["--resources", "gpu=2,mem=256"])
    plain = start_worker()
    text = text.replace("tcp://127.0.0.1:5555", gpu.endpoint).replace("tcp://127.0.0.1:5556", plain.endpoint)
    out = _run_example(text, tmp_path)
    assert out.startswith(f"{{{gpu.pid}}} [8, 7, 6, 5, 4, 3, 2, 1]"), out
    assert "[{'gpu': 2.0, 'mem': 256.0}, {}]" in out, out


@pytest.mark.slow  # the demo: ten seconds of prime counting, the same on every Python
def test_the_two_commands(tmp_path: Path) -> None:
    block = _only("two-commands")
    commands = [line for line in block.text.splitlines() if line and not line.startswith("#")]
    assert commands == ["pip install . && python examples/demo.py", "pip install '.[test]' && python -m pytest"]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines(), "CI must run the README's test command"
    # The package is installed (these tests run under it); the demo is the rest of command 1.
    done = subprocess.run([sys.executable, "examples/demo.py"], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    assert "identical on every executor" in done.stdout


def test_the_command_line_synopsis_lists_every_option() -> None:
    block = _only("the command-line synopsis")
    documented: dict[str, set[str]] = {}
    command = None
    for line in block.text.splitlines():
        start = re.match(r"zmqexecutor (\w+)", line)
        if start:
            command = start.group(1)
        elif not line.startswith(" "):
            command = None  # "python -m zmqexecutor worker ...": the same command, another spelling
        if command:
            documented.setdefault(command, set()).update(re.findall(r"--[a-z][a-z-]*", line))
    assert set(documented) == {"worker", "keygen", "status", "ping", "drain", "top", "ssh", "slurm"}
    for command, options in documented.items():
        usage = subprocess.run([sys.executable, "-m", "zmqexecutor", command, "--help"], capture_output=True,
                               text=True, timeout=30).stdout
        actual = set(re.findall(r"--[a-z][a-z-]*", usage)) - {"--help"}
        assert options == actual, f"zmqexecutor {command}: README {sorted(options)}, --help {sorted(actual)}"


# --- deployment: systemd and a container ----------------------------------------------------------


def _zmqexecutor_script(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "zmqexecutor"
    script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m zmqexecutor \"$@\"\n")
    script.chmod(0o755)
    return script


def _serve_then_stop(argv: list[str], client_keys: Path, stop_timeout: float) -> None:
    """Start a worker the way a service manager would, use it, stop it with SIGTERM: it must exit 0."""
    assert "tcp://0.0.0.0:5555" in argv
    port = free_port()
    argv = [arg.replace("tcp://0.0.0.0:5555", f"tcp://0.0.0.0:{port}") for arg in argv]
    worker = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(worker.stderr), daemon=True).start()
    try:
        assert wait_until(lambda: "worker ready" in "".join(log), timeout=30), "".join(log)
        assert "security=CurveZMQ (1 allowed client keys)" in "".join(log)
        with ZMQExecutor(f"tcp://127.0.0.1:{port}", keys=client_keys, connect_timeout=20) as ex:
            assert list(ex.map(abs, range(-3, 3))) == [3, 2, 1, 0, 1, 2]
        task_processes = children_of(worker.pid)
        assert task_processes
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
    assert code == 0, "".join(log)
    assert wait_until(lambda: not any(alive(pid) for pid in task_processes), timeout=5)


def _unit_settings(unit: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))


def test_the_memory_limits_example_serves_and_replaces_a_leaking_process(keys: Path) -> None:
    command = _only("memory limits example").text.strip()
    port = free_port()
    command = command.replace("tcp://0.0.0.0:5555", f"tcp://127.0.0.1:{port}").replace("keys/worker", str(keys / "worker"))
    # 2 GiB is the example's; this test's leak is smaller.
    command = command.replace("--max-memory-per-child 2GiB", "--max-memory-per-child 100MiB")
    # This Python's zmqexecutor, whichever the PATH would find first.
    argv = [sys.executable, "-m", "zmqexecutor", *shlex.split(command)[1:]]
    worker = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)])))
    try:
        with ZMQExecutor([f"tcp://127.0.0.1:{port}"], keys=keys / "client") as ex:
            first = ex.submit(leak_and_tell, 150).result(timeout=60)
            assert ex.submit(leak_and_tell, 0).result(timeout=60) != first
    finally:
        worker.send_signal(signal.SIGINT)
        _, log = worker.communicate(timeout=30)
    assert "max_memory_per_child (100.0 MiB); replacing it" in log, log


_LEAKED: list[bytes] = []


def leak_and_tell(mib: int) -> int:
    _LEAKED.append(b"\x01" * (mib << 20))
    return os.getpid()


def test_the_systemd_unit(tmp_path: Path, keys: Path) -> None:
    unit = _only("systemd unit").text
    settings = _unit_settings(unit)
    assert settings["KillMode"] == "mixed" and settings["Restart"] == "on-failure"
    home = tmp_path / "home" / "zx"
    _zmqexecutor_script(home / "zx" / "bin")
    shutil.copytree(keys / "worker", home / "zx-keys")
    local_unit = unit.replace("/home/zx", str(home)).replace("User=zx", "User=root")
    if shutil.which("systemd-analyze"):
        path = tmp_path / "zmqexecutor-worker.service"
        path.write_text(local_unit)
        checked = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    # What systemd runs, run here: it serves a secured client, and SIGTERM to the main process alone
    # (KillMode=mixed) stops it cleanly within TimeoutStopSec, with no task process left behind.
    _serve_then_stop(shlex.split(_unit_settings(local_unit)["ExecStart"]), keys / "client",
                     stop_timeout=float(settings["TimeoutStopSec"]))


def test_the_container_entrypoint_and_run_command(tmp_path: Path, keys: Path) -> None:
    dockerfile = _only("dockerfile").text
    run = _only("docker run").text.replace("\\\n", " ")
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)
    assert entrypoint
    argv = json.loads(entrypoint.group(1))
    run_line = next(line for line in run.splitlines() if line.startswith("docker run"))
    words = shlex.split(run_line.replace('"$(id -u):$(id -g)"', f"{os.getuid()}:{os.getgid()}"))
    image = words.index("zmqexecutor-worker")
    argv += words[image + 1:]
    volume = words[words.index("-v") + 1]
    source, target, mode = volume.split(":")
    assert (target, mode) == ("/keys", "ro") and source == "~/zx-keys/worker"
    assert "--user" in words and "tcp://0.0.0.0:5555" in argv
    # No Docker daemon here: run what the container runs, with /keys pointing at a copy of the keys.
    argv = [arg.replace("/keys", str(keys / "worker")) for arg in argv]
    argv[0] = str(_zmqexecutor_script(tmp_path / "bin"))
    _serve_then_stop(argv, keys / "client", stop_timeout=10)


# --- the two-host walk-through, verbatim, with the worker host in its own network namespace -----

SCP = """#!{python}
# scp to the test's worker host: "HOST:PATH" is PATH under that host's home folder.
import os, shutil, sys
args = [a for a in sys.argv[1:] if not a.startswith("-")]
*sources, target = args
host, _, path = target.partition(":")
assert host == os.environ["WORKER"], f"scp to an unknown host {{host!r}}"
destination = os.path.join({worker_home!r}, path)
for source in sources:
    if os.path.isdir(source):
        shutil.copytree(source, destination if not os.path.isdir(destination)
                        else os.path.join(destination, os.path.basename(source)))
    else:
        shutil.copy2(source, destination)
"""


def _copy_of_the_clone(into: Path) -> Path:
    clone = into / "zmqexecutor"
    clone.mkdir(parents=True)
    for name in ("setup.cfg", "pyproject.toml", "README.rst"):
        shutil.copy2(ROOT / name, clone / name)
    shutil.copytree(ROOT / "zmqexecutor", clone / "zmqexecutor", ignore=shutil.ignore_patterns("__pycache__"))
    return clone


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_two_host_walk_through(namespace, tmp_path: Path) -> None:
    name, address, _ = namespace
    client_home, worker_home, bin_dir = tmp_path / "client", tmp_path / "worker", tmp_path / "bin"
    worker_home.mkdir()
    bin_dir.mkdir()
    clone = _copy_of_the_clone(client_home)
    scp = bin_dir / "scp"
    scp.write_text(SCP.format(python=sys.executable, worker_home=str(worker_home)))
    scp.chmod(scp.stat().st_mode | stat.S_IXUSR)
    python_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([str(bin_dir), python_dir, os.environ["PATH"]])
    base = {"PATH": path, "LANG": "C.UTF-8", **{k: v for k, v in os.environ.items() if k.startswith("PIP_")}}

    step1 = _only("walk-through, on the client").text
    assert "export WORKER=192.0.2.10 " in step1
    step1 = step1.replace("export WORKER=192.0.2.10 ", f"export WORKER={address} ")
    (clone / "client.py").write_text(_only("walk-through, client.py").text)
    step3 = _only("walk-through, on the client again").text
    step1_done, worker_ready = tmp_path / "step1.done", tmp_path / "worker.ready"
    # One shell, as a reader would have: step 1, then (once the worker is up) step 3.
    client_script = (f"set -euo pipefail\ncd {shlex.quote(str(clone))}\n{step1}\ntouch {step1_done}\n"
                     f"while [ ! -e {worker_ready} ]; do sleep 0.2; done\n{step3}")
    client = subprocess.Popen(["bash", "-c", client_script], env=dict(base, HOME=str(client_home)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client_output: list[str] = []
    threading.Thread(target=lambda: client_output.extend(client.stdout), daemon=True).start()
    worker = None
    try:
        assert wait_until(lambda: step1_done.exists() or client.poll() is not None, timeout=300), "step 1 hangs"
        assert step1_done.exists(), "".join(client_output)
        *install, serve = _only("walk-through, on the worker").text.strip().splitlines()
        assert serve.startswith("zmqexecutor worker ")
        worker_env = dict(base, HOME=str(worker_home))
        # Installing needs the package index, which the namespace cannot reach; serving runs in it.
        installed = subprocess.run(["bash", "-c", "set -euo pipefail\ncd\n" + "\n".join(install)],
                                   env=worker_env, capture_output=True, text=True, timeout=300)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        worker = subprocess.Popen(
            ["ip", "netns", "exec", name, "bash", "-c", f"cd && . ~/zx/bin/activate && exec {serve}"],
            env=worker_env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        worker_log: list[str] = []
        threading.Thread(target=lambda: worker_log.extend(worker.stderr), daemon=True).start()
        assert wait_until(lambda: "worker ready" in "".join(worker_log), timeout=60), "".join(worker_log)
        worker_ready.touch()
        assert client.wait(120) == 0, "".join(client_output)
        output = "".join(client_output)
        assert f"tcp://{address}:5555  ok" in output and "security CurveZMQ" in output
        assert [int(n) for n in re.findall(r"^\S+: (\d+)$", output, re.M)] == [x * x for x in range(8)]
        # The tasks ran on the worker in the other namespace: ask it.
        status = subprocess.run(
            [str(client_home / "zx" / "bin" / "zmqexecutor"), "status", f"tcp://{address}:5555"],
            env=dict(base, HOME=str(client_home), ZMQEXECUTOR_KEYS=str(client_home / "zx-keys" / "client")),
            capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert re.search(r"tasks done 8\b", status.stdout), status.stdout
    finally:
        if client.poll() is None:
            client.kill()
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                assert worker.wait(20) == 0
            finally:
                if worker.poll() is None:
                    worker.kill()


# --- scaling out: the launchers and the Kubernetes recipe ---------------------------------------------


@pytest.mark.slow
def test_the_ssh_example_against_a_real_sshd(ssh_host, tmp_path: Path) -> None:
    host, _, options = ssh_host
    text = _only("ssh example").text
    assert '["node1", "node2"]' in text and 'python="/opt/venv/bin/python"' in text
    # The example's own defaults otherwise: the address towards the host, keys made for the run.
    text = text.replace('["node1", "node2"]', repr([host, host])).replace(
        'python="/opt/venv/bin/python"', f"python={sys.executable!r}, ssh_options={options!r}")
    assert _run_example(text, tmp_path).strip() == "500500"


@pytest.mark.slow
def test_the_slurm_example_against_a_real_slurm(slurm_cluster, tmp_path: Path) -> None:
    env, here = slurm_cluster
    text = _only("slurm example").text
    assert 'partition="compute"' in text
    text = text.replace('partition="compute"', f'partition="zx", address="tcp://{here}:0", folder={str(tmp_path)!r}')
    assert _run_example(text, tmp_path, env=env).strip() == "500500"


@pytest.mark.slow
def test_the_kubernetes_manifest_command_starts_a_worker_that_dials_in(tmp_path: Path) -> None:
    text = _only("kubernetes manifest").text
    (line,) = [line for line in text.splitlines() if line.strip().startswith("command:")]
    command = json.loads(line.split("command:", 1)[1])
    assert command[:2] == ["sh", "-c"]
    script = command[2]
    assert "--connect tcp://client.example.org:5555" in script and "--keys /tmp/keys" in script
    subprocess.run([sys.executable, "-m", "zmqexecutor", "keygen", str(tmp_path / "keys")], check=True,
                   capture_output=True, timeout=60)
    mounted = tmp_path / "mounted"  # as a Secret volume mounts it: readable by everyone
    shutil.copytree(tmp_path / "keys" / "worker", mounted)
    for path in [mounted, *mounted.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = free_port()
    zx = _zmqexecutor_script(tmp_path / "bin")
    script = (script.replace("/tmp/keys", str(tmp_path / "private")).replace("/keys/", f"{mounted}/")
              .replace("tcp://client.example.org:5555", f"tcp://127.0.0.1:{port}").replace("exec zmqexecutor", f"exec {zx}"))
    with ZMQExecutor(listen=f"tcp://127.0.0.1:{port}", keys=tmp_path / "keys" / "client") as ex:
        pod = subprocess.Popen(["sh", "-c", script], stderr=subprocess.PIPE, text=True)
        try:
            ex.wait_for_workers(1, timeout=30)
            assert ex.submit(sum, [1, 2]).result(timeout=30) == 3
            assert ex.workers()[0].slots == 4
        finally:
            pod.send_signal(signal.SIGTERM)  # what Kubernetes sends: it drains and exits 0
            assert pod.wait(40) == 0, pod.stderr.read() if pod.stderr else ""


@pytest.mark.slow  # the same on every Python
def test_the_documentation_builds_with_sphinx_warnings_as_errors(tmp_path: Path) -> None:
    pytest.importorskip("sphinx")
    built = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(ROOT / "docs"),
                            str(tmp_path / "html")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    index = (tmp_path / "html" / "index.html").read_text()
    assert "Quick start: one machine" in index  # the README's quick start, included
    reference = (tmp_path / "html" / "reference.html").read_text()
    assert "ResourcesUnavailableError" in reference and "wait_for_workers" in reference
    assert len(list((tmp_path / "html").glob("*.html"))) >= 17


def test_the_readme_stays_short_and_points_at_every_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < 300
    pages = {page.name for page in PAGES if page != README and page.name != "index.rst"}
    assert {name for name in re.findall(r"``docs/([\w-]+\.rst)``", text)} == pages
