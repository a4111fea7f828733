"""``nginx -t`` and ``haproxy -c`` load deploy/nginx.conf and deploy/haproxy.cfg, as shipped and
rendered for loopback (tests/helpers.py), and with the limits docs/deploy.md adds to them. The
static checks of the same files are in tests/unit/test_deploy_files.py.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import (
    HAPROXY,
    HAPROXY_CFG,
    NGINX,
    ROOT,
    fenced_blocks,
    nginx_command,
    render_haproxy,
    write_nginx,
)


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


def doc_snippet(lang: str, marker: str) -> dict[str, str]:
    """The block of docs/deploy.md in ``lang`` that holds ``marker``, split at its
    ``# in CONTEXT:`` comment lines: ``{"http {}": "limit_conn_zone ...", ...}``."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    [code] = [c for lg, c in fenced_blocks(text) if lg == lang and marker in c]
    parts = re.split(r"^# in (.+):$", code, flags=re.MULTILINE)
    assert parts[0].strip() == "", code
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")
def test_deploy_doc_nginx_limits_load_into_the_shipped_file(tmp_path):
    parts = doc_snippet("nginx", "limit_conn")
    assert set(parts) == {"http {}", "location = /ws {}"}
    conf = write_nginx(tmp_path, "127.0.0.1:18080", ["127.0.0.1:8765"])
    text = conf.read_text()
    text, n = re.subn(r"^http \{\n", lambda m: m.group(0) + parts["http {}"], text,
                      flags=re.MULTILINE)
    assert n == 1
    text, n = re.subn(r"^([ \t]*)location = /ws \{\n", lambda m: m.group(0) + parts[
        "location = /ws {}"], text, flags=re.MULTILINE)
    assert n == 1
    conf.write_text(text)
    result = subprocess.run(nginx_command(tmp_path, conf, "-t"), capture_output=True, text=True,
                            check=False, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")
def test_deploy_doc_haproxy_limits_load_into_the_shipped_file(tmp_path):
    parts = doc_snippet("haproxy", "stick-table")
    assert set(parts) == {"frontend hub_in"}
    text = render_haproxy("127.0.0.1:18080", ["127.0.0.1:8765"])
    text, n = re.subn(r"^frontend hub_in\n", lambda m: m.group(0) + "".join(
        f"    {line}\n" for line in parts["frontend hub_in"].strip().splitlines()), text,
        flags=re.MULTILINE)
    assert n == 1
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    assert HAPROXY is not None
    result = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True,
                            check=False, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
