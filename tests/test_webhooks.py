"""Webhook targets and delivery: internal addresses refused in every spelling, the checked address is the one
connected to, one deadline per delivery, a bounded pool. Nothing here sends to anything but loopback listeners:
refusals are tested on the check itself, deliveries only to 127.0.0.1 / localhost listeners of this test."""

import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer

import anyio
import pytest
from prometheus_client import generate_latest

from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.serve.serving import Server, ServerConfig
from sdaot.runtime.serve.webhook_address import refusal, resolve_target
from sdaot.runtime.serve.webhooks import deliver

INTERNAL = ["http://127.0.0.1/", "http://2130706433/", "http://0x7f000001/", "http://0177.0.0.1/",
            "http://127.1/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/",
            "http://localhost/", "http://LOCALHOST./", "http://0.0.0.0/", "http://0/", "http://169.254.169.254/",
            "http://10.1.2.3/", "http://172.16.0.1/", "http://192.168.1.1/", "http://100.64.0.1/",
            "http://224.0.0.1/", "http://239.255.255.250/", "http://240.0.0.1/", "http://255.255.255.255/",
            "http://[fe80::1]/", "http://[fc00::1]/", "http://[ff02::1]/", "http://[::]/",
            "http://[64:ff9b::7f00:1]/", "http://[2002:7f00:1::1]/", "https://127.0.0.1:8443/x"]


@pytest.mark.parametrize("url", INTERNAL)
def test_internal_addresses_are_refused_in_every_spelling(url):
    with pytest.raises(InvalidRequestError) as refused:
        resolve_target(url, [])
    assert refused.value.param == "webhook_url"


def test_public_addresses_pass_the_check_without_anything_being_sent():
    for address in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"):
        assert refusal(ipaddress.ip_address(address)) is None, address
    target = resolve_target("https://93.184.216.34:8443/hook?a=1", [])
    assert target.pinned_url() == "https://93.184.216.34:8443/hook?a=1"


@pytest.mark.parametrize("url", ["http://[::1", "http://[::1]:99999/", "http://host:port/", "ftp://127.0.0.1/x",
                                 "file:///etc/passwd", "not a url", "http:///nohost", "http://u:p@127.0.0.1/"])
def test_malformed_urls_are_refused_naming_the_field(url):
    with pytest.raises(InvalidRequestError) as refused:
        resolve_target(url, ["127.0.0.1"])
    assert refused.value.param == "webhook_url"


def test_an_allow_list_admits_its_private_hosts_and_only_them():
    assert resolve_target("http://127.0.0.1:9/x", ["127.0.0.1"]).address.is_loopback
    assert resolve_target("http://LocalHost:9/x", ["localhost"]).address.is_loopback
    for url in ("http://2130706433:9/x", "http://localhost:9/x", "http://93.184.216.34/x"):
        with pytest.raises(InvalidRequestError):
            resolve_target(url, ["127.0.0.1"])


class Recorder(BaseHTTPRequestHandler):
    """Answers 200 and notes each request's Host header; waits for `release` first when it is set up."""

    hosts: list = []
    release: threading.Event | None = None

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if Recorder.release is not None:
            Recorder.release.wait(60)
        Recorder.hosts.append(self.headers["Host"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def listener():
    """A loopback listener on the address `localhost` resolves to first (the address a delivery pins)."""
    family, *_, sockaddr = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)[0]
    Recorder.hosts, Recorder.release = [], None
    server_class = type("Listener", (ThreadingHTTPServer,), {"address_family": family})
    server = server_class((sockaddr[0], 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    if Recorder.release is not None:
        Recorder.release.set()
    server.shutdown()


def test_a_delivery_goes_to_the_checked_address_with_the_urls_host_header(listener):
    url = f"http://localhost:{listener}/hook"
    assert anyio.run(deliver, url, {"id": "job"}, ["localhost"]) == "delivered"
    assert Recorder.hosts == [f"localhost:{listener}"]


def test_a_delivery_to_an_internal_address_is_refused_at_send_time_too(listener):
    """A URL that passed an earlier check (the host was allowed then) is checked again when sent."""
    outcome = anyio.run(deliver, f"http://localhost:{listener}/hook", {"id": "job"}, [])
    assert outcome == "refused" and Recorder.hosts == []


class Trickle(BaseHTTPRequestHandler):
    """Sends its answer's status line one byte at a time, never finishing: every read gets data in time."""

    def do_POST(self):
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 600:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.1)

    def log_message(self, *args):
        pass


def test_a_delivery_has_one_deadline_not_a_timeout_per_read():
    server = HTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        assert anyio.run(deliver, url, {"id": "job"}, ["127.0.0.1"], 2.0) == "timed out"
    finally:
        server.shutdown()


def test_past_the_pool_bound_a_delivery_is_dropped_logged_and_counted(listener, caplog):
    Recorder.release = threading.Event()
    server = Server(ServerConfig(webhook_allow=["localhost"], webhook_workers=1, webhook_backlog=1))
    url = f"http://localhost:{listener}/hook"
    sent = [server.webhooks.send(url, lambda: {"id": "job"}, f"job_{i}") for i in range(3)]
    assert sent == [True, True, False]
    assert any("dropped" in r.getMessage() for r in caplog.records)
    metrics = generate_latest(server.registry).decode()
    assert 'sdaot_webhooks_total{outcome="dropped"} 1.0' in metrics
    Recorder.release.set()
    deadline = time.time() + 60
    while 'sdaot_webhooks_total{outcome="delivered"} 2.0' not in generate_latest(server.registry).decode():
        assert time.time() < deadline, generate_latest(server.registry).decode()
        time.sleep(0.05)
    assert len(Recorder.hosts) == 2
    server.webhooks.shutdown()
