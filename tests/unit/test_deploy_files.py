"""The deployment files use only what hub has: subcommands, flags, HUB_* variables, ports, paths.

No container engine runs here, so docker-compose.yml, deploy/Dockerfile, deploy/k8s/*.yaml,
deploy/hub.service and deploy/hub.env are parsed and checked against the CLI contract
(:func:`hub.cli.build_parser`, :data:`hub.config.OPTIONS`) and the server's HTTP paths.
deploy/nginx.conf and deploy/haproxy.cfg are rendered for loopback (tests/helpers.py:
:func:`render_nginx`, :func:`render_haproxy`, also used by tests/system/test_proxy_e2e.py);
``nginx -t`` and ``haproxy -c`` check them in tests/system/test_deploy_configs_load.py.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

import pytest

from hub.cli import build_parser
from hub.config import OPTIONS, Config
from hub.supervisor import STOP_MARGIN
from tests.helpers import (
    DEPLOY,
    HAPROXY_CFG,
    NGINX_CONF,
    ROOT,
    fenced_blocks,
    render_haproxy,
    render_nginx,
)

#: The HTTP paths of a hub process (hub/server.py, docs/protocol.md).
HUB_PATHS = {"/ws", "/healthz", "/readyz", "/metrics"}
HUB_ENV = {opt.env for opt in OPTIONS}
DEFAULTS = {opt.name: opt.default for opt in OPTIONS}


# -- helpers -------------------------------------------------------------------------------------

def doc_section(text: str, heading: str) -> str:
    """The part of a Markdown text from the heading that starts with ``heading`` to the next
    heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}.*?$", text, re.MULTILINE)
    assert match, f"no heading {heading!r}"
    level = len(match.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(text, match.end())
    return text[match.start():end.start() if end else len(text)]


def nginx_directives(text: str) -> list[tuple[str, list[str]]]:
    """``(context path, [name, *args])`` of every nginx directive, comments and quotes handled
    enough for deploy/nginx.conf: ``("events", ["worker_connections", "32768"])``."""
    out: list[tuple[str, list[str]]] = []
    stack: list[str] = []
    words: list[str] = []
    for token in re.findall(r"'[^']*'|\"[^\"]*\"|#[^\n]*|[{};]|[^\s{};'\"#]+", text):
        if token.startswith("#"):
            continue
        if token == "{":
            stack.append(words[0] if words else "")
            words = []
        elif token == "}":
            stack.pop()
        elif token == ";":
            out.append((" ".join(stack), words))
            words = []
        else:
            words.append(token[1:-1] if token[0] in "'\"" else token)
    assert not stack and not words, "unbalanced nginx configuration"
    return out


def directive(text: str, context: str, name: str) -> list[str]:
    """The arguments of the one directive ``name`` in ``context`` ("" for main)."""
    found = [args[1:] for ctx, args in nginx_directives(text) if ctx == context and args[0] == name]
    assert len(found) == 1, f"{name} in {context or 'main'}: {found}"
    return found[0]


#: The languages of the fenced blocks of docs/deploy.md that are shell commands.
SHELL = {"sh", "bash", "console"}
#: nginx variables that hold the query string, or a request line with it.
QUERY_VARIABLES = re.compile(r"\$(request|request_uri|args|query_string|arg_\w+|is_args)\b")
#: haproxy log-format tags that hold it: %r / %{+Q}r (request line), %HU (URI), %HQ (query).
QUERY_TAGS = re.compile(r"%(\{[^}]*\})?(r|HU|HQ)\b")


def check_hub_command(argv: list[str]) -> None:
    """``argv`` (after ``hub``) parses with the real parser; ``hub serve`` flags build a Config.

    ``--help`` and ``--version`` must exit 0."""
    if {"-h", "--help", "--version"} & set(argv):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 0, f"`hub {' '.join(argv)}` exits {exit_.value.code}"
        return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`hub {' '.join(argv)}` is not accepted by hub.cli.build_parser()")
    if args.command == "serve":
        Config.from_sources({k: v for k, v in vars(args).items() if k != "command"}, {})


def hub_commands(text: str) -> list[list[str]]:
    """Every ``hub ...`` command line in a shell text, as argv after ``hub``."""
    found = []
    for line in text.splitlines():
        for part in re.split(r";|&&|\|\||\bdo\b|\bthen\b", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]  # VAR=x hub ...
            while words and words[0] in ("sudo", "exec", "while", "until", "if"):
                words = words[1:]
            if words and Path(words[0]).name == "hub" and len(words) > 1:
                found.append(words[1:])
    return found


def check_env(env: dict[str, str], where: str) -> Config:
    """Every HUB_* name is an option's variable and the values make a valid Config."""
    unknown = sorted(k for k in env if k.startswith("HUB_") and k not in HUB_ENV)
    assert not unknown, f"{where}: {unknown} are not variables of hub.config.OPTIONS"
    return Config.from_sources({}, {k: str(v) for k, v in env.items() if k.startswith("HUB_")})


def dockerfile() -> dict[str, list[str]]:
    """Instructions of deploy/Dockerfile by keyword, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            out.setdefault(keyword.upper(), []).append(rest.strip())
    return out


def dockerfile_env() -> dict[str, str]:
    env = {}
    for rest in dockerfile()["ENV"]:
        env.update(dict(w.split("=", 1) for w in shlex.split(rest)))
    return env


def load_yaml(path: Path) -> list:
    """The documents of a YAML file (PyYAML is in the test extra; skip without it)."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install PyYAML)")
    return list(yaml.safe_load_all(path.read_text()))


def k8s_docs(name: str) -> list[dict]:
    return [d for d in load_yaml(DEPLOY / "k8s" / name) if d]


def hub_deployment() -> dict:
    [dep] = [d for d in k8s_docs("hub.yaml") if d["kind"] == "Deployment"]
    return dep


def compose() -> dict:
    [doc] = load_yaml(ROOT / "docker-compose.yml")
    return doc


def env_list(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


# -- Dockerfile ----------------------------------------------------------------------------------

def test_dockerfile():
    ins = dockerfile()
    assert ins["FROM"] == ["python:3.11-slim"]
    assert json.loads(ins["ENTRYPOINT"][-1]) == ["hub", "serve"]
    env = dockerfile_env()
    config = check_env(env, "deploy/Dockerfile")
    assert config.host == "0.0.0.0"
    assert ins["EXPOSE"] == [str(config.port)]
    user = ins["USER"][-1]
    assert user not in ("root", "0"), "the image must not run as root"
    health = ins["HEALTHCHECK"][0]
    assert "/healthz" in health and "urllib" in health and "curl" not in health
    assert any(r.startswith("pip install .") for r in ins["RUN"])
    assert ins["STOPSIGNAL"] == ["SIGTERM"]


# -- docker-compose.yml --------------------------------------------------------------------------

def test_compose_services_use_real_commands_and_variables():
    services = compose()["services"]
    assert {"redis", "hub", "nginx", "publisher"} <= set(services)
    hub = services["hub"]
    assert hub["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / hub["build"]["context"] / hub["build"]["dockerfile"]).exists()
    assert hub["deploy"]["replicas"] == 3
    image_env = dockerfile_env()
    config = check_env({**image_env, **hub["environment"]}, "docker-compose.yml hub")
    assert config.redis_url == ("redis://redis:6379/0",)
    grace = float(hub["stop_grace_period"].rstrip("s"))
    assert grace > config.shutdown_timeout

    publisher = services["publisher"]
    check_env(publisher["environment"], "docker-compose.yml publisher")
    script = " ".join(publisher["entrypoint"][2:] + publisher["command"])
    commands = hub_commands(script.replace("$$", "$"))
    assert commands and all(c[0] == "publish" for c in commands), commands
    for argv in commands:
        check_hub_command(argv)
    redis_host = config.redis_url[0].split("//")[1].split(":")[0]
    assert redis_host in services


def test_compose_nginx_reaches_the_hub_port():
    services = compose()["services"]
    nginx = services["nginx"]
    [mount] = [v for v in nginx["volumes"] if "nginx.conf" in v]
    source, target, *_ = mount.split(":")
    assert (ROOT / source).resolve() == NGINX_CONF
    assert target == "/etc/nginx/nginx.conf"  # a whole nginx.conf, not a conf.d file
    [server] = re.findall(r"^\s*server\s+([\w.-]+:\d+)", NGINX_CONF.read_text(), re.MULTILINE)
    host, port = server.rsplit(":", 1)
    assert host == "hub" and "hub" in services
    config = check_env({**dockerfile_env(), **services["hub"]["environment"]}, "compose hub")
    assert int(port) == config.port


# -- Kubernetes ----------------------------------------------------------------------------------

def test_k8s_hub_deployment():
    dep = hub_deployment()
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [container] = pod["spec"]["containers"]
    env = env_list(container)
    config = check_env({**dockerfile_env(), **env}, "deploy/k8s/hub.yaml")
    check_hub_command(["serve", *container.get("args", [])])  # the image's ENTRYPOINT + args
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listeners = [config.port] if config.metrics_port is None else [config.port,
                                                                    config.metrics_port]
    assert list(ports.values()) == listeners

    # With --metrics-port the probes go there (own listener, not behind the clients' queue).
    probe_port = config.port if config.metrics_port is None else config.metrics_port
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == probe_port
    annotations = pod["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:  # scrape where /metrics is served
        assert int(annotations["prometheus.io/port"]) == probe_port

    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
    pre_stop_sleep = float(pre_stop["command"][1]) if pre_stop else 0.0
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop_sleep + config.shutdown_timeout
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_k8s_services_match_their_pods():
    dep = hub_deployment()
    [service] = [d for d in k8s_docs("hub.yaml") if d["kind"] == "Service"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    [container] = dep["spec"]["template"]["spec"]["containers"]
    names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names

    redis_docs = k8s_docs("redis.yaml")
    [redis_dep] = [d for d in redis_docs if d["kind"] == "Deployment"]
    [redis_svc] = [d for d in redis_docs if d["kind"] == "Service"]
    assert redis_svc["spec"]["selector"].items() <= \
        redis_dep["spec"]["template"]["metadata"]["labels"].items()
    url = env_list(container)["HUB_REDIS_URL"]
    host, port = url.split("//")[1].split("/")[0].split(":")
    assert host == redis_svc["metadata"]["name"]
    assert int(port) in {p["port"] for p in redis_svc["spec"]["ports"]}


# -- systemd -------------------------------------------------------------------------------------

def test_systemd_unit():
    unit = configparser.ConfigParser(strict=True, interpolation=None, comment_prefixes=("#",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "hub.service").read_text())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "hub"
    check_hub_command(argv[1:])
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert Path(service["EnvironmentFile"].lstrip("-")).name == "hub.env"

    env = dict(line.split("=", 1) for line in (DEPLOY / "hub.env").read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    config = check_env(env, "deploy/hub.env")
    stop = float(service["TimeoutStopSec"].rstrip("s"))
    margin = STOP_MARGIN if config.workers > 1 else 0.0
    assert stop > config.shutdown_timeout + margin


# -- nginx and haproxy ---------------------------------------------------------------------------

def proxied_paths(text: str, pattern: str) -> set[str]:
    return {p for p in re.findall(pattern, text) if p != "/"}


def test_nginx_conf_directives():
    text = NGINX_CONF.read_text()
    assert re.search(r"^\s*least_conn;", text, re.MULTILINE)
    assert "proxy_http_version 1.1;" in text
    assert re.search(r"proxy_set_header Upgrade \$http_upgrade;", text)
    assert re.search(r"proxy_set_header Connection \$connection_upgrade;", text)
    assert "X-Forwarded-For $proxy_add_x_forwarded_for" in text
    assert re.search(r"max_fails=\d+", text) and "passive" in text
    assert "proxy_next_upstream error" in text
    ping = DEFAULTS["ping_interval"]
    for timeout in re.findall(r"proxy_(?:read|send)_timeout (\d+)s;", text):
        assert int(timeout) > ping
    paths = proxied_paths(text, r"location\s+=?\s*(\S+)\s*\{")
    assert "/ws" in paths and paths <= HUB_PATHS


#: Debian's /etc/nginx/nginx.conf: `worker_connections 768;`.
DEBIAN_WORKER_CONNECTIONS = 768


def test_nginx_conf_is_whole_and_sized_for_websockets():
    text = NGINX_CONF.read_text()
    contexts = {ctx for ctx, _ in nginx_directives(text)}
    assert {"", "events", "http", "http upstream", "http server"} <= contexts
    connections = int(directive(text, "events", "worker_connections")[0])
    nofile = int(directive(text, "", "worker_rlimit_nofile")[0])
    assert directive(text, "", "worker_processes") == ["auto"]
    # Two connections per WebSocket; far above Debian's default, and with descriptors to spare.
    assert connections // 2 >= 10 * (DEBIAN_WORKER_CONNECTIONS // 2)
    assert nofile >= connections + 1024
    # The level that shows "worker_connections are not enough" (a warn line).
    assert directive(text, "", "error_log")[1] in ("warn", "notice", "info", "debug")
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for stated in (f"worker_connections {connections}", f"worker_rlimit_nofile {nofile}",
                   f"{connections // 2} WebSocket clients per worker",
                   f"{DEBIAN_WORKER_CONNECTIONS // 2} clients per worker"):
        assert stated in doc, f"docs/deploy.md should say {stated!r}"


def test_nginx_access_log_has_no_query_string():
    text = NGINX_CONF.read_text()
    formats = {}
    for ctx, args in nginx_directives(text):
        if args[0] == "log_format":
            assert ctx == "http"
            formats[args[1]] = "".join(args[2:])
    logs = [(ctx, args[1:]) for ctx, args in nginx_directives(text) if args[0] == "access_log"]
    assert logs, "deploy/nginx.conf should log with its own format"
    for ctx, args in logs:
        if args == ["off"]:
            continue
        assert len(args) >= 2, f"access_log {args} in {ctx} uses `combined`, which logs $request"
        fmt = formats[args[1]]
        assert not QUERY_VARIABLES.search(fmt), fmt
        assert "$uri" in fmt and "$http_referer" not in fmt
    # No access_log below http that would bring `combined` back for one location.
    assert {ctx for ctx, _ in logs} == {"http"}


def test_haproxy_log_format_has_no_query_string():
    text = HAPROXY_CFG.read_text()
    assert not re.search(r"^\s*option\s+(httplog|httpslog)\b", text, re.MULTILINE)
    [fmt] = re.findall(r"^\s*log-format\s+(.*)$", text, re.MULTILINE)
    assert not QUERY_TAGS.search(fmt), fmt
    assert "%HM %HP %HV" in fmt


def test_haproxy_cfg_directives():
    text = HAPROXY_CFG.read_text()
    assert re.search(r"^\s*balance leastconn", text, re.MULTILINE)
    assert re.search(r"^\s*option httpchk GET /healthz", text, re.MULTILINE)
    assert re.search(r"^\s*option forwardfor", text, re.MULTILINE)
    ping = DEFAULTS["ping_interval"]
    for timeout in re.findall(r"timeout (?:client|server|tunnel) (\d+)s", text):
        assert int(timeout) > ping
    [acl] = re.findall(r"\{ path ([^}]+)\}", text)
    assert "/ws" in acl.split() and set(acl.split()) <= HUB_PATHS
    for _, address in re.findall(r"^\s*server\s+(\S+)\s+(\S+)", text, re.MULTILINE):
        assert int(address.rsplit(":", 1)[1]) == DEFAULTS["port"]


def test_render_keeps_every_server_parameter():
    hubs = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
    nginx = render_nginx("127.0.0.1:9000", hubs)
    upstream_re = r"^\s*server (\S+) max_fails=1 fail_timeout=10s;"
    assert re.findall(upstream_re, nginx, re.MULTILINE) == hubs
    assert "listen 127.0.0.1:9000;" in nginx and "hub:8765" not in nginx
    haproxy = render_haproxy("127.0.0.1:9000", hubs)
    assert re.findall(r"^\s*server hub\d (\S+) check$", haproxy, re.MULTILINE) == hubs
    assert "bind 127.0.0.1:9000" in haproxy and "hub1:8765" not in haproxy


# -- docs/deploy.md ------------------------------------------------------------------------------

def test_deploy_doc_commands_and_variables_exist():
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = "\n".join(code for lang, code in fenced_blocks(text) if lang in SHELL)
    commands = hub_commands(blocks)
    assert any(c[0] == "serve" for c in commands)
    for argv in commands:
        check_hub_command(argv)
    unknown = sorted(set(re.findall(r"\bHUB_[A-Z_]+\b", text)) - HUB_ENV)
    assert not unknown, f"docs/deploy.md names variables hub does not read: {unknown}"
    local = r"(?:https?|wss?)://(?:127\.0\.0\.1|localhost|hub|HOST)(?::\d+)?(/[\w/]*)"
    paths = set(re.findall(local, text)) - {"/"}
    assert paths and paths <= HUB_PATHS, paths


def test_deploy_doc_walkthrough_installs_what_the_unit_expects():
    unit = configparser.ConfigParser(strict=True, interpolation=None, comment_prefixes=("#",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit_text = (DEPLOY / "hub.service").read_text()
    unit.read_string(unit_text)
    service = unit["Service"]
    hub_bin = Path(shlex.split(service["ExecStart"])[0])
    venv = hub_bin.parent.parent  # /opt/hub/venv/bin/hub -> /opt/hub/venv
    env_file = service["EnvironmentFile"].lstrip("-")
    user = service["User"]
    if service.get("ProtectHome", "no") != "no":
        assert not venv.is_relative_to("/home") and not venv.is_relative_to("/root"), venv

    doc = (ROOT / "docs" / "deploy.md").read_text()
    walk = doc_section(doc, "Step by step")
    shell = "\n".join(code for lang, code in fenced_blocks(walk) if lang in SHELL)
    shell = re.sub(r"\\\n\s*", " ", shell)  # continuation lines joined
    lines = [" ".join(shlex.split(line, comments=True)) for line in shell.splitlines()]
    # The unit's venv is created and the project installed into it.
    assert any(f"python3 -m venv {venv}" in line for line in lines), shell
    assert any(f"{venv}/bin/pip install" in line for line in lines), shell
    # Its user, its settings at its EnvironmentFile path, the unit itself.
    assert any(re.search(rf"useradd .*--system.* {user}$", line) for line in lines), shell
    assert any(re.search(rf"install .*deploy/hub\.env {re.escape(env_file)}$", line)
               for line in lines), shell
    assert any(re.search(r"install .*deploy/hub\.service /etc/systemd/system/hub\.service$",
                         line) for line in lines), shell
    assert any("systemctl enable --now hub" in line for line in lines), shell
    # Every hub or python the walkthrough runs is the venv's.
    for word in re.findall(r"\S*/bin/(?:hub|python|pip)\b", shell):
        assert word.startswith(f"{venv}/bin/"), word
    assert "~/" not in shell
    # nginx.conf goes where nginx reads its main configuration.
    assert "deploy/nginx.conf" in shell and "/etc/nginx/nginx.conf" in shell
    # The unit's own install notes say the same.
    header = "\n".join(line for line in unit_text.splitlines() if line.startswith("#"))
    for needle in (f"python3 -m venv {venv}", f"{venv}/bin/pip install", f"{env_file}",
                   "useradd --system"):
        assert needle in header, needle
