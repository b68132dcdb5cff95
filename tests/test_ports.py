"""megatron_patch.ports.free_port: rendezvous ports come from below the kernel's ephemeral
range (where gloo's and every other outgoing connection's ports come from), and are free."""
import socket

from megatron_patch import ports


def test_port_below_the_ephemeral_range_and_free():
    start = ports._ephemeral_start()
    got = {ports.free_port() for _ in range(20)}
    assert all(ports.LOWEST <= p < start for p in got), (sorted(got), start)
    assert len(got) > 1  # drawn at random, not a fixed port
    for p in got:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # nobody listens there


def test_taken_port_is_not_returned(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(ports, "LOWEST", busy)
        monkeypatch.setattr(ports, "_ephemeral_start", lambda: busy + 1000)
        assert all(ports.free_port() != busy for _ in range(50))
