"""`huse serve` as a command: loopback by default, a busy port or a missing extra is one `Error:` line
before the model loads, and the listening socket is one asyncio gives TCP_NODELAY (a kept-alive
response must not wait ~40 ms for a delayed ACK)."""
from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner

import cli
from huse_pipeline.serve import server


def test_defaults_are_loopback_and_read_only():
    cfg = server.ServeConfig()
    assert cfg.host == "127.0.0.1" and server.is_loopback(cfg.host) and cfg.port == 8000
    assert server.is_loopback("localhost") and server.is_loopback("::1")
    assert not server.is_loopback("0.0.0.0") and not server.is_loopback("192.168.1.4")


def test_bind_gives_a_tcp_socket_on_a_free_port():
    sock = server.bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockname()[1] > 0
        assert server.url_of(sock) == f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        sock.close()


def test_busy_port_is_one_line(serve_demo):
    busy = server.bind("127.0.0.1", 0)
    try:
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli.main, ["serve", "--run", str(serve_demo["run"]), "--port", str(port)])
    finally:
        busy.close()
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: cannot listen on 127.0.0.1:{port}" in result.output and "another --port" in result.output


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setattr(server, "missing_packages", lambda: ["fastapi"])
    result = CliRunner().invoke(cli.main, ["serve"])
    assert result.exit_code == 1
    assert result.output.strip() == 'Error: huse serve needs the serve extra: pip install -e ".[serve]" (missing: fastapi)'


def test_missing_index_is_refused(serve_demo, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(serve_demo["run"], run, ignore=shutil.ignore_patterns("index"))
    result = CliRunner().invoke(cli.main, ["serve", "--run", str(run), "--features", str(serve_demo["features"]),
                                           "--port", "0", "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "huse index" in result.output


@pytest.mark.parametrize("host", ["no-such-host.invalid"])
def test_bad_host(host):
    with pytest.raises(Exception, match="not an address"):
        server.bind(host, 0)
