"""What a client can reach, over a real uvicorn on loopback: keys on every path but a short public list under
any prefix, the page's security headers and CSP, the Host check of no-key mode, /readyz details only with a
key, and Ray's `app()` refusing to start without keys."""

import base64
import hashlib
import re
from pathlib import Path

import httpx
import pytest
from test_server import AUTH, assert_error, start_server

PREFIX = "/sdaot"
PUBLIC = ["/", "/web/app.js", "/web/style.css", "/healthz", "/readyz", "/docs", "/openapi.json"]
PRIVATE = [("GET", "/v1/samplers"), ("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/jobs"),
           ("GET", "/v1/jobs/job_0"), ("POST", "/v1/image/generation"), ("GET", "/v1/nothing"),
           ("GET", "/nothing"), ("GET", "/web")]
WEB = Path(__file__).parent.parent / "runtime" / "serve" / "web"


@pytest.fixture(scope="module")
def prefixed():
    """A keyed server behind a (pretend) proxy that strips /sdaot: uvicorn --root-path /sdaot."""
    proc, url = start_server(["--models", "SD1.5", "--root-path", PREFIX])
    yield url
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def keyless():
    """A server without keys, so loopback only."""
    proc, url = start_server(["--models", "SD1.5"], env_extra={"SDAOT_API_KEYS": ""})
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_every_path_but_the_public_ones_needs_a_key_under_a_root_path(prefixed):
    for path in PUBLIC:
        assert httpx.get(f"{prefixed}{path}").status_code == 200, path
    for method, path in PRIVATE:
        resp = httpx.request(method, f"{prefixed}{path}", json={})
        assert_error(resp, 401, "authorization")
    assert httpx.get(f"{prefixed}/v1/samplers", headers=AUTH).status_code == 200
    assert "sdaot_requests_total" in httpx.get(f"{prefixed}/metrics", headers=AUTH).text


def test_the_page_and_the_docs_work_under_the_root_path(prefixed):
    page = httpx.get(f"{prefixed}/").text
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert links and not [link for link in links if link.startswith("/")], links
    for link in links:
        assert httpx.get(f"{prefixed}/{link}").status_code == 200, link
    script = (WEB / "app.js").read_text()
    assert not re.search(r"""(fetch|api)\(\s*[`"']/""", script), "an absolute URL breaks under a prefix"
    assert f"{PREFIX}/openapi.json" in httpx.get(f"{prefixed}/docs").text


def test_security_headers_and_a_csp_without_inline_script(prefixed):
    for path, headers in (("/", {}), ("/web/app.js", {}), ("/healthz", {}), ("/v1/samplers", {}),
                          ("/v1/samplers", AUTH), ("/docs", {})):
        resp = httpx.get(f"{prefixed}{path}", headers=headers)
        assert resp.headers["x-content-type-options"] == "nosniff", path
        assert resp.headers["x-frame-options"] == "DENY", path
        assert resp.headers["referrer-policy"] == "no-referrer", path
        assert re.fullmatch(r"[0-9a-f]{12}", resp.headers["x-request-id"]), path
        csp = resp.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    csp = httpx.get(f"{prefixed}/").headers["content-security-policy"]
    assert "script-src 'self';" in csp and "default-src 'none'" in csp
    page = httpx.get(f"{prefixed}/").text
    assert all(re.search(r"\ssrc=", tag) for tag in re.findall(r"<script[^>]*>", page)), "inline script"
    docs = httpx.get(f"{prefixed}/docs")
    inline = re.findall(r"<script>(.*?)</script>", docs.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert len(inline) == 1 and f"'sha256-{digest}'" in docs.headers["content-security-policy"]


def test_the_page_puts_no_server_or_user_text_into_html():
    """Names (LoRA files, models, samplers) and messages reach the page as text: a LoRA file named
    `<img src=x onerror=...>.safetensors` must stay a name, never markup."""
    script = (WEB / "app.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", script)


def test_readyz_gives_details_only_with_a_key(prefixed):
    assert httpx.get(f"{prefixed}/readyz").json() == {"status": "ready"}
    assert httpx.get(f"{prefixed}/readyz", headers=AUTH).json() == {"status": "ready", "models": ["SD1.5"]}


def test_readyz_hides_why_a_load_failed_without_a_key():
    proc, url = start_server(["--models", "SD1.5", "--weights", "/nonexistent/weights"], wait_for="/healthz")
    try:
        import time

        deadline = time.time() + 60
        while "not found" not in httpx.get(f"{url}/readyz", headers=AUTH).text and time.time() < deadline:
            time.sleep(0.5)
        detailed = assert_error(httpx.get(f"{url}/readyz", headers=AUTH), 503)["message"]
        assert "--weights tiny" in detailed and "/nonexistent" not in detailed, detailed
        bare = assert_error(httpx.get(f"{url}/readyz"), 503)["message"]
        assert "weights" not in bare and "not ready" in bare
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_without_keys_only_loopback_host_names_are_answered(keyless):
    port = httpx.URL(keyless).port
    for host in ("evil.example", f"evil.example:{port}", "192.168.1.9", "localhost.evil.example", ""):
        body = assert_error(httpx.get(f"{keyless}/v1/samplers", headers={"Host": host}), 400, "host")
        assert "DNS rebinding" in body["message"]
    refused = httpx.get(f"{keyless}/", headers={"Host": "evil.example"})
    assert refused.status_code == 400 and refused.headers["x-frame-options"] == "DENY"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "127.0.0.2"):
        assert httpx.get(f"{keyless}/v1/samplers", headers={"Host": host}).status_code == 200, host
    assert httpx.get(f"{keyless}/readyz").json()["models"] == ["SD1.5"], "no key needed: details shown"


def test_root_path_must_be_a_path():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sdaot.runtime.cli", "serve", "--root-path", "sdaot", "--port", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "root_path" in done.stderr


def test_ray_app_refuses_to_start_without_keys(monkeypatch):
    pytest.importorskip("ray")
    import yaml

    from sdaot.runtime.errors import InvalidRequestError
    from sdaot.runtime.serve.ray.deployments import app

    monkeypatch.delenv("SDAOT_API_KEYS", raising=False)
    with pytest.raises(InvalidRequestError) as refused:
        app({"models": "SD1.5"})
    assert refused.value.param == "api_keys" and "insecure_no_auth" in refused.value.message
    assert app({"models": "SD1.5", "insecure_no_auth": "true"}) is not None
    assert app({"models": "SD1.5", "api_keys": "k1"}) is not None
    sample = yaml.safe_load((Path(__file__).parent.parent / "docs" / "ray-serve.yaml").read_text())
    for application in sample["applications"]:
        keys = application.get("runtime_env", {}).get("env_vars", {}).get("SDAOT_API_KEYS", "")
        assert not keys.strip() and not application["args"].get("api_keys"), "the sample must hold no usable key"
        monkeypatch.setenv("SDAOT_API_KEYS", keys)
        with pytest.raises(InvalidRequestError):
            app(application["args"])
