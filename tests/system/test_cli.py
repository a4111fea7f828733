"""The ``hub`` command as an operator meets it: ``--version``, ``--help``, and for every
configuration error one line ``hub: ...`` on stderr and exit code 2, never a traceback.

Every case runs ``python -m hub`` as a subprocess with no ``HUB_*`` variable inherited.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import tomllib

import pytest

import hub
from hub.config import OPTIONS
from tests.helpers import ROOT, config_error, free_port, run_cli, run_python

# -- --version ------------------------------------------------------------------------------------


def test_version_prints_the_distribution_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hub {hub.__version__}\n"


def test_version_is_the_installed_one_or_pyproject_s():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == hub._SOURCE_VERSION
    try:
        installed = importlib.metadata.version(project["name"])
    except importlib.metadata.PackageNotFoundError:
        installed = hub._SOURCE_VERSION
    assert hub.__version__ == installed


# -- --help ---------------------------------------------------------------------------------------


def option_helps(help_text: str) -> dict[str, str]:
    """``{first flag: its whole help text}`` from argparse's ``--help`` output."""
    helps: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        if match := re.match(r"^  (-[\w-]+)", line):
            current = match.group(1)
            helps[current] = line.strip()
        elif current and line.startswith("    "):
            helps[current] += " " + line.strip()
        else:
            current = None
    return helps


@pytest.mark.parametrize("command", ["serve", "publish"])
def test_every_option_s_help_states_its_default_once(command):
    result = run_cli(command, "--help", env={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    helps = option_helps(result.stdout)
    helps.pop("-h")
    if command == "serve":
        assert set(helps) == {opt.flag for opt in OPTIONS}
    for flag, text in helps.items():
        assert len(re.findall(r"\bdefault", text)) == 1, text
        if flag == "--idempotency-key":  # one message's key: an exported variable would
            assert "no variable; default none" in text, text  # silently drop repeats
            continue
        assert f"(env HUB_{flag[2:].upper().replace('-', '_')}; default " in text, text


def test_allowed_origin_help_does_not_contradict_itself():
    helps = option_helps(run_cli("serve", "--help", env={"COLUMNS": "100"}).stdout)
    text = helps["--allowed-origin"]
    assert text.endswith("(env HUB_ALLOWED_ORIGIN; default any Origin)"), text
    assert "none" not in text


# -- configuration errors: one line, exit 2 -------------------------------------------------------


def test_single_process_on_a_port_in_use_exits_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = config_error(run_cli("serve", "--port", str(port)))
    assert line == f"hub: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize("host", ["256.1.1.1", "hub-test.invalid"])
@pytest.mark.parametrize("workers", [[], ["--workers", "2", "--redis-url", "redis://127.0.0.1:1"]])
def test_a_host_that_is_no_address_exits_2(host, workers):
    line = config_error(run_cli("serve", "--host", host, "--port", str(free_port()), *workers))
    assert line.startswith(f"hub: --host {host!r} is neither an IP address nor a name that "
                           "resolves"), line


def test_a_host_that_is_not_local_exits_2():
    line = config_error(run_cli("serve", "--host", "192.0.2.1", "--port", str(free_port())))
    assert line.startswith("hub: cannot listen on 192.0.2.1:"), line


BAD_REDIS_URLS = {
    "notaurl": "must specify one of the following schemes",
    "http://x": "must specify one of the following schemes",
    "redis://host:notaport": "Port could not be cast to integer",
}


@pytest.mark.parametrize("url", BAD_REDIS_URLS)
def test_serve_with_a_malformed_redis_url_exits_2(url):
    line = config_error(run_cli("serve", "--port", str(free_port()), "--redis-url", url,
                                timeout=20))
    assert line.startswith(f"hub: --redis-url {url!r}: "), line
    assert BAD_REDIS_URLS[url] in line


@pytest.mark.parametrize("url", BAD_REDIS_URLS)
def test_publish_with_a_malformed_redis_url_exits_2(url):
    line = config_error(run_cli("publish", "news", "{}", "--redis-url", url))
    assert line.startswith(f"hub: --redis-url {url!r}: "), line


def test_a_malformed_redis_url_from_the_environment_exits_2():
    line = config_error(run_cli("serve", "--port", str(free_port()),
                                env={"HUB_REDIS_URL": "redis://127.0.0.1:1,notaurl"}))
    assert line.startswith("hub: --redis-url 'notaurl': "), line


def test_a_redis_url_error_does_not_show_the_password():
    line = config_error(run_cli("serve", "--redis-url", "redis://:s3cret@host:notaport"))
    assert "s3cret" not in line
    assert "redis://:***@host:notaport" in line


# -- the uvloop import does not leak into tracebacks ----------------------------------------------

FAILING_SERVER = textwrap.dedent("""
    import sys
    sys.modules["uvloop"] = None  # as if it were not installed: importing it fails
    import hub.server
    async def start(self, reuse_port=False):
        raise RuntimeError("a bug in the server")
    hub.server.Hub.start = start
    from hub.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_server_traceback_does_not_carry_the_uvloop_import_error():
    result = run_python("-c", FAILING_SERVER, "serve", "--port", str(free_port()))
    assert result.returncode == 1
    assert "RuntimeError: a bug in the server" in result.stderr
    assert "uvloop" not in result.stderr, result.stderr
    assert "During handling of the above exception" not in result.stderr


# -- --loop ---------------------------------------------------------------------------------------

WITHOUT_UVLOOP = ("import sys; sys.modules['uvloop'] = None; from hub.cli import main; "
                  "sys.exit(main(sys.argv[1:]))")


def serve_log(*args: str, prelude: str | None = None, env: dict[str, str] | None = None) -> str:
    """Start ``hub serve ARGS`` on a free port, wait for its listening line, stop it with
    SIGTERM, and return its log (asserting exit 0)."""
    port = free_port()
    cmd = ["-c", prelude, "serve"] if prelude else ["-m", "hub", "serve"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, *cmd, "--port", str(port), *args], cwd=ROOT,
                            env={**clean, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(lines) + out
    return "".join(lines) + out


@pytest.mark.parametrize(("flags", "prelude", "loop"), [
    ((), None, "uvloop"),  # auto, uvloop installed (the test extra has it)
    (("--loop", "auto"), WITHOUT_UVLOOP, "asyncio"),
    (("--loop", "asyncio"), None, "asyncio"),
    (("--loop", "uvloop"), None, "uvloop"),
])
def test_loop_choice_is_the_loop_the_hub_runs_on(flags, prelude, loop):
    log = serve_log(*flags, prelude=prelude)
    assert re.search(rf"listening on 127\.0\.0\.1:\d+ \(MemoryBroker broker, {loop} loop\)",
                     log), log


def test_loop_from_the_environment():
    log = serve_log(env={"HUB_LOOP": "asyncio"})
    assert "asyncio loop)" in log, log


@pytest.mark.parametrize("workers", [(), ("--workers", "2", "--redis-url",
                                          "redis://127.0.0.1:1")])
def test_loop_uvloop_without_uvloop_exits_2(workers):
    result = run_python("-c", WITHOUT_UVLOOP, "serve", "--port", str(free_port()),
                        "--loop", "uvloop", *workers)
    assert "--loop uvloop: uvloop is not installed" in config_error(result)


def test_a_bad_loop_value_is_a_usage_error():
    result = run_cli("serve", "--loop", "trio")
    assert result.returncode == 2 and "invalid choice: 'trio'" in result.stderr


# -- --config -------------------------------------------------------------------------------------


def test_a_wrong_configuration_file_exits_2_naming_file_and_key(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text("[namespaces.chat]\nhistory_size = 100\nhistory_ttl = \"ten minutes\"\n")
    line = config_error(run_cli("serve", "--config", str(path)))
    assert f"{path}: namespaces.chat.history_ttl: expected a number of seconds" in line
    line = config_error(run_cli("serve", env={"HUB_CONFIG": str(tmp_path / "nope.toml")}))
    assert "nope.toml: cannot read it" in line
    line = config_error(run_cli("publish", "news", "{}", "--config", str(path)))
    assert "namespaces.chat.history_ttl" in line


def test_the_configuration_file_sets_options(tmp_path):
    port = free_port()
    path = tmp_path / "hub.toml"
    path.write_text(f'port = {port}\nloop = "asyncio"\n\n[namespaces.chat]\n'
                    'history_size = 100\nhistory_ttl = 600\n')
    log = serve_log("--config", str(path))  # serve_log's --port comes first: the flag wins
    assert "asyncio loop)" in log, log
    # a file without a flag given: its port is used
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "hub", "serve", "--config", str(path)],
                            cwd=ROOT, env=clean, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "listening on" in line:
                assert f"127.0.0.1:{port} " in line, line
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
