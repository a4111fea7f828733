"""The deployment files use only what hub has: subcommands, flags, HUB_* variables, ports, paths.

No container engine runs here, so docker-compose.yml, deploy/Dockerfile, deploy/k8s/*.yaml,
deploy/hub.service and deploy/hub.env are parsed and checked against the CLI contract
(:func:`hub.cli.build_parser`, :data:`hub.config.OPTIONS`) and the server's HTTP paths.
deploy/nginx.conf and deploy/haproxy.cfg are rendered for loopback (:func:`render_nginx`,
:func:`render_haproxy`, also used by tests/test_proxy_e2e.py) and checked by ``nginx -t`` and
``haproxy -c`` when those binaries are installed.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from hub.cli import build_parser
from hub.config import OPTIONS, Config
from hub.supervisor import STOP_MARGIN

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NGINX_CONF = DEPLOY / "nginx.conf"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)
HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None)

#: The HTTP paths of a hub process (hub/server.py, docs/protocol.md).
HUB_PATHS = {"/ws", "/healthz", "/readyz", "/metrics"}
HUB_ENV = {opt.env for opt in OPTIONS}
DEFAULTS = {opt.name: opt.default for opt in OPTIONS}


# -- rendering the proxy configurations for a test ----------------------------------------------

def render_nginx(listen: str, hubs: list[str]) -> str:
    """deploy/nginx.conf with ``listen`` (``127.0.0.1:PORT``) and one upstream line per hub.

    Each hub line keeps the parameters (``max_fails=...``) of the shipped ``server`` line; the
    rest of the file is unchanged. The result is an http-context file, see
    :func:`nginx_main_conf`.
    """
    text = NGINX_CONF.read_text()
    [(indent, params)] = re.findall(r"^([ \t]*)server[ \t]+\S+((?:[ \t]+[^;\s]+)*);$", text,
                                   re.MULTILINE)
    lines = "".join(f"{indent}server {hub}{params};\n" for hub in hubs)
    text = _replace_lines(text, r"^[ \t]*server[ \t]+\S+(?:[ \t]+[^;\s]+)*;\n", lines)
    text, n = re.subn(r"^([ \t]*)listen[ \t]+\S+;", rf"\g<1>listen {listen};", text, flags=re.MULTILINE)
    assert n == 1, "deploy/nginx.conf should have one listen line"
    return text


def nginx_main_conf(prefix: Path, site: Path) -> str:
    """A main nginx.conf for a test: the test's own temp paths and logs, then ``site``."""
    temp = "".join(f"    {kind}_temp_path {prefix / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"worker_processes 2;\n"
            f"worker_rlimit_nofile 8192;\n"
            f"events {{ worker_connections 4096; }}\n"
            f"http {{\n"
            f"    access_log {prefix / 'access.log'};\n"
            f"{temp}"
            f"    include {site};\n"
            f"}}\n")


def nginx_command(prefix: Path, conf: Path, *extra: str) -> list[str]:
    """Run nginx in the foreground with every file it writes under ``prefix``."""
    assert NGINX is not None
    return [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
            "-g", f"daemon off; pid {prefix / 'nginx.pid'};", *extra]


def write_nginx(prefix: Path, listen: str, hubs: list[str]) -> Path:
    """Write the rendered site and a main config under ``prefix``; return the main config."""
    prefix.mkdir(parents=True, exist_ok=True)
    site = prefix / "hub.conf"
    site.write_text(render_nginx(listen, hubs))
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_main_conf(prefix, site))
    return conf


def render_haproxy(bind: str, hubs: list[str]) -> str:
    """deploy/haproxy.cfg with ``bind`` (``127.0.0.1:PORT``) and one server line per hub.

    Each line ``server hubN ADDRESS ...`` keeps the parameters of the first shipped line.
    """
    text = HAPROXY_CFG.read_text()
    [(indent, params), *_] = re.findall(r"^([ \t]*)server[ \t]+\S+[ \t]+\S+(.*)$", text, re.MULTILINE)
    lines = "".join(f"{indent}server hub{i} {hub}{params}\n" for i, hub in enumerate(hubs, 1))
    text = _replace_lines(text, r"^[ \t]*server[ \t]+\S+[ \t]+\S+.*\n", lines)
    text, n = re.subn(r"^([ \t]*)bind[ \t]+\S+", rf"\g<1>bind {bind}", text, flags=re.MULTILINE)
    assert n == 1, "deploy/haproxy.cfg should have one bind line"
    return text


def _replace_lines(text: str, pattern: str, lines: str) -> str:
    """``text`` with the first line matching ``pattern`` replaced by ``lines``, the others cut."""
    seen = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal seen
        seen += 1
        return lines if seen == 1 else ""

    return re.sub(pattern, replace, text, flags=re.MULTILINE)


# -- helpers -------------------------------------------------------------------------------------

def check_hub_command(argv: list[str]) -> None:
    """``argv`` (after ``hub``) parses with the real parser; ``hub serve`` flags build a Config."""
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
    assert target.startswith("/etc/nginx/conf.d/")
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
    assert list(ports.values()) == [config.port]

    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == config.port

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
    assert re.findall(r"^\s*server (\S+) max_fails=1 fail_timeout=10s;", nginx, re.MULTILINE) == hubs
    assert "listen 127.0.0.1:9000;" in nginx and "hub:8765" not in nginx
    haproxy = render_haproxy("127.0.0.1:9000", hubs)
    assert re.findall(r"^\s*server hub\d (\S+) check$", haproxy, re.MULTILINE) == hubs
    assert "bind 127.0.0.1:9000" in haproxy and "hub1:8765" not in haproxy


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")
def test_nginx_config_test_passes(tmp_path):
    conf = write_nginx(tmp_path, "127.0.0.1:18080", ["127.0.0.1:8765", "127.0.0.1:8766"])
    result = subprocess.run(nginx_command(tmp_path, conf, "-t"), capture_output=True, text=True,
                            check=False,
                            timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")
@pytest.mark.parametrize("rendered", [False, True], ids=["as-shipped", "rendered"])
def test_haproxy_config_check_passes(tmp_path, rendered):
    cfg = tmp_path / "haproxy.cfg"
    text = HAPROXY_CFG.read_text()
    if rendered:
        text = render_haproxy("127.0.0.1:18080", ["127.0.0.1:8765", "127.0.0.1:8766"])
    cfg.write_text(text)
    assert HAPROXY is not None
    result = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True,
                            check=False,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# -- docs/deploy.md ------------------------------------------------------------------------------

def test_deploy_doc_commands_and_variables_exist():
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = "\n".join(re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, re.DOTALL))
    commands = hub_commands(blocks)
    assert any(c[0] == "serve" for c in commands)
    for argv in commands:
        check_hub_command(argv)
    unknown = sorted(set(re.findall(r"\bHUB_[A-Z_]+\b", text)) - HUB_ENV)
    assert not unknown, f"docs/deploy.md names variables hub does not read: {unknown}"
    local = r"(?:https?|wss?)://(?:127\.0\.0\.1|localhost|hub|HOST)(?::\d+)?(/[\w/]*)"
    paths = set(re.findall(local, text)) - {"/"}
    assert paths and paths <= HUB_PATHS, paths
