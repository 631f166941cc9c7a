"""Clients on another host (network namespaces joined by veth pairs, each with
its own host name and /dev/shm) get byte-identical frames inline and need
the token; one loader over two such servers survives one's loss."""
from ops.hosts import make_hosts, run_loader, serve_on


def test_a_client_on_another_host_gets_inline_frames_and_needs_the_token(tmp_path):
    hosts = make_hosts(["server", "client"])
    try:
        server_ip, _ = hosts.link("server", "client")
        token = tmp_path / "token"
        server = serve_on(hosts, "server", server_ip, tmp_path, "--token-file", str(token))
        try:
            refused = run_loader(hosts, "client", [server.address])
            served = run_loader(hosts, "client", [server.address],
                                env={"PSANA_IPC_TOKEN_FILE": str(token)})
        finally:
            assert server.stop() == 0, server.log()
    finally:
        hosts.close()
    assert refused["error"] == "unauthorized" and refused["frames"] == 0
    assert served["transport"] == "inline"
    assert served["frames"] == served["identical"] == 40 and served["lost"] == []


def test_two_hosts_feed_one_loader_and_the_loss_of_one_is_survived(tmp_path):
    hosts = make_hosts(["a", "b", "client"])
    try:
        a_ip, _ = hosts.link("a", "client")
        b_ip, _ = hosts.link("b", "client")
        a = serve_on(hosts, "a", a_ip, tmp_path, "--token-file", str(tmp_path / "token"))
        b = serve_on(hosts, "b", b_ip, tmp_path, "--token-file", str(tmp_path / "token"))
        try:
            env = {"PSANA_IPC_TOKEN_FILE": str(tmp_path / "token")}
            both = run_loader(hosts, "client", [a.address, b.address], env=env)
            survived = run_loader(hosts, "client", [a.address, b.address], "--kill", str(b.pid),
                                  env=env)
        finally:
            assert a.stop() == 0, a.log()
            b.stop()
    finally:
        hosts.close()
    assert both["frames"] == both["identical"] == 40 and both["lost"] == []
    assert survived["frames"] == survived["identical"] == 40
    assert survived["lost"] == [b.address]
