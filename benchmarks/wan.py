"""Training over a simulated WAN: two nodes reach the coordinator only through a lossy,
slow, delayed link.

On one machine a proxy on loopback carries only the handshake: iroh moves the connection to
the direct path as soon as it learns the coordinator's real address. So this benchmark puts
the coordinator and the nodes in two network namespaces that cannot reach each other, and the
only way between them is ``benchmarks/netsim.py``'s ``WanProxy`` in the root namespace::

    ns C (drift-c-PID)                    root namespace                   ns N (drift-n-PID)
    coordinator 10.77.1.2:P  <-- veth -->  10.77.1.1    10.77.2.1:Q  <-- veth -->  2 nodes
                                           proxy: 10.77.2.1:Q -> 10.77.1.2:P       10.77.2.2
                                           (delay, rate cap, loss)        dial --via 10.77.2.1:Q

No namespace has a default route and the root namespace does not forward (ip_forward is
checked, never changed), so from ns N 10.77.1.2 is unreachable; the benchmark checks that
before every proxied profile (a UDP echo in ns C answers the root namespace, not ns N).

Profiles (``--profiles``):

- ``direct``: the baseline, no proxy. A veth pair between ns C (10.77.3.1) and ns N
  (10.77.3.2) exists only during this profile; the coordinator binds 10.77.3.1 and the nodes
  dial the token's address: kernel to kernel, no userspace hop.
- ``lan``: 1 ms one way, 1000 Mbit/s, no loss (mostly the cost of the userspace proxy).
- ``wan``: 20 ms one way, 50 Mbit/s, 1 % loss per datagram.
- ``bad``: 60 ms one way, 10 Mbit/s, 3 % loss.

The delay, rate and loss apply to each direction; the proxy has one queue per direction
shared by both nodes (one access link at the coordinator). Each profile runs a fresh
coordinator (``drift-coord serve`` inside ns C, ``--quorum 1.0``) and two node processes
(inside ns N: the char-LM of ``benchmarks/_common.py`` with ``DriftStrategy``, each timing
its ``trainer.fit``). Every profile runs with overlapped and with blocking rounds
(``--modes``), with two equal nodes; the ``--pair-profiles`` also run a 1x/3x pair (one node
sleeps after every batch, ``--slowdown``). Figures per run: each node's **utilization** (the
share of its ``trainer.fit`` spent in training steps, the strategy's waits, hand-offs and
applies taken out), its fit time, barrier wait, samples share and speed, the bytes on the
nodes' link (the ns N veth's rx+tx counters), what the proxy forwarded and dropped, and
whether both nodes ended bit for bit on the coordinator's final checkpoint. By default the
data is sized so that each node trains about ``--train-seconds`` in ``--rounds`` rounds on
this machine as busy as it is (``--train-seconds 0``: the data flags as given).

    sudo .venv/bin/python benchmarks/wan.py                       # all four profiles
    sudo .venv/bin/python benchmarks/wan.py --profiles direct,bad --epochs 1
    sudo .venv/bin/python benchmarks/wan.py --d-model 128 --n-layers 4   # a bigger model

Needs root (``ip netns``, veth). Namespaces, links and processes are removed on exit, on
Ctrl-C and on SIGTERM. The last line printed is ``wan: utilization overlap direct <a>,
lan <b>, wan <c>, bad <d>; blocking ...`` (the lower of the two equal nodes per run); the
line before it gives the 1x/3x pair.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402


@dataclass(frozen=True)
class Profile:
    name: str
    delay_ms: float = 0.0
    rate_mbit: float = 0.0
    loss: float = 0.0
    proxied: bool = True

    def describe(self) -> str:
        if not self.proxied:
            return "no proxy (veth C<->N)"
        return f"{self.delay_ms:g} ms, {self.rate_mbit:g} Mbit/s, {self.loss * 100:g}% loss"


PROFILES = {
    "direct": Profile("direct", proxied=False),
    "lan": Profile("lan", 1, 1000, 0.0),
    "wan": Profile("wan", 20, 50, 0.01),
    "bad": Profile("bad", 60, 10, 0.03),
}

SUBNETS = ("10.77.1.0/24", "10.77.2.0/24", "10.77.3.0/24")
C_ROOT, C_NS = "10.77.1.1", "10.77.1.2"  # root <-> ns C
N_ROOT, N_NS = "10.77.2.1", "10.77.2.2"  # root <-> ns N
D_C, D_N = "10.77.3.1", "10.77.3.2"  # ns C <-> ns N, only during `direct`
COORD_PORT = 7842
# The default run's size (see docs/benchmarks.md). Utilization is training time over fit time,
# and a fit has fixed costs (join, calibration, start-up sync, the last, blocking barrier), so
# a run must train long enough for them to be a small part of it: by default the data and the
# rounds are sized so that each node trains about TRAIN_SECONDS in ROUNDS rounds on this
# machine as busy as it is now (a short step-time probe decides), which also keeps the whole
# run near 25 minutes. The model is small (172 KiB) so that a round's upload and download fit
# inside a round's training even at `bad`.
DEFAULTS = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_chars": 2_300_000, "stride": 32}
DEFAULT_SYNC_EVERY = 100
TRAIN_SECONDS = 90.0
ROUNDS = 10


class Refused(Exception):
    """The benchmark cannot run here (not root, no ip netns, addresses already in use)."""


# ---------------------------------------------------------------------------- the network


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _no_ipv6(ns: str | None, ifname: str) -> None:
    """Turn IPv6 off on one of our links, so it carries no link-local address."""
    cmd = ["sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    subprocess.run(cmd, capture_output=True)  # best effort: no IPv6 at all is fine too


class Net:
    """Two namespaces, one veth pair from each to the root namespace; torn down by close()."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.ns_c, self.ns_n = f"drift-c-{pid}", f"drift-n-{pid}"
        # interface names: at most 15 characters
        self.if_c, self.if_c_peer = f"dwc{pid}", f"dwcp{pid}"
        self.if_n, self.if_n_peer = f"dwn{pid}", f"dwnp{pid}"
        self.if_d_c, self.if_d_n = f"dwdc{pid}", f"dwdn{pid}"
        self.created: list[str] = []
        self.links: list[str] = []

    def preflight(self) -> None:
        if os.geteuid() != 0:
            raise Refused(
                "needs root: it creates network namespaces and veth links "
                "(run it as root, e.g. `sudo .venv/bin/python benchmarks/wan.py`)"
            )
        if shutil.which("ip") is None:
            raise Refused("needs the `ip` command (iproute2) to create network namespaces")
        taken = {ipaddress.ip_network(s) for s in SUBNETS}
        for line in _ip("-o", "-4", "addr", "show").splitlines():
            addr = line.split()[3]
            if any(ipaddress.ip_interface(addr).ip in net for net in taken):
                raise Refused(
                    f"{addr} is already configured here ({line.split()[1]}): another wan.py run? "
                    f"this benchmark uses {', '.join(SUBNETS)}"
                )

    def setup(self) -> None:
        for ns in (self.ns_c, self.ns_n):
            try:
                _ip("netns", "add", ns)
            except RuntimeError as exc:
                raise Refused(f"`ip netns add` does not work here: {exc}") from None
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            subprocess.run(
                ["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                capture_output=True,
            )
        for ns, root_if, peer_if, root_ip, ns_ip in (
            (self.ns_c, self.if_c, self.if_c_peer, C_ROOT, C_NS),
            (self.ns_n, self.if_n, self.if_n_peer, N_ROOT, N_NS),
        ):
            _ip("link", "add", root_if, "type", "veth", "peer", "name", peer_if, "netns", ns)
            self.links.append(root_if)
            _no_ipv6(None, root_if)
            _no_ipv6(ns, peer_if)
            _ip("addr", "add", f"{root_ip}/24", "dev", root_if)
            _ip("link", "set", root_if, "up")
            _ip("-n", ns, "addr", "add", f"{ns_ip}/24", "dev", peer_if)
            _ip("-n", ns, "link", "set", peer_if, "up")

    def add_direct(self) -> None:
        """The baseline's link: a veth pair straight from ns C to ns N."""
        _ip("-n", self.ns_c, "link", "add", self.if_d_c, "type", "veth",
            "peer", "name", self.if_d_n, "netns", self.ns_n)  # fmt: skip
        _no_ipv6(self.ns_c, self.if_d_c)
        _no_ipv6(self.ns_n, self.if_d_n)
        _ip("-n", self.ns_c, "addr", "add", f"{D_C}/24", "dev", self.if_d_c)
        _ip("-n", self.ns_n, "addr", "add", f"{D_N}/24", "dev", self.if_d_n)
        _ip("-n", self.ns_c, "link", "set", self.if_d_c, "up")
        _ip("-n", self.ns_n, "link", "set", self.if_d_n, "up")

    def remove_direct(self) -> None:
        with contextlib.suppress(RuntimeError):
            _ip("-n", self.ns_c, "link", "del", self.if_d_c)

    def node_link(self, direct: bool) -> dict[str, int]:
        """Byte and packet counters of the nodes' link, read in ns N."""
        ifname = self.if_d_n if direct else self.if_n_peer
        stats = json.loads(_ip("-n", self.ns_n, "-j", "-s", "link", "show", "dev", ifname))
        s = stats[0]["stats64"]
        return {
            "bytes": int(s["rx"]["bytes"]) + int(s["tx"]["bytes"]),
            "rx_packets": int(s["rx"]["packets"]),
            "tx_packets": int(s["tx"]["packets"]),
        }

    def routes(self, ns: str) -> str:
        return _ip("-n", ns, "-4", "route").strip().replace("\n", "; ")

    def close(self) -> None:
        """Kill whatever is left in our namespaces (only our own children can be), then remove
        the links and the namespaces."""
        for ns in self.created:
            with contextlib.suppress(RuntimeError):
                for pid in _ip("netns", "pids", ns).split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
        for link in self.links:
            with contextlib.suppress(RuntimeError):
                _ip("link", "del", link)
        for ns in self.created:
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", ns)
        self.created, self.links = [], []


def _udp_probe(addr: tuple[str, int], timeout: float = 1.0) -> str:
    """Send one datagram to an echo server; 'echo' when it answered, else why not."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(b"drift-probe", addr)
            data, _ = s.recvfrom(64)
        except OSError as exc:  # socket.timeout is an OSError
            return f"no answer ({exc.strerror or exc})"
        return "echo" if data == b"drift-probe" else "garbage"


def check_isolation(net: Net, work: Path) -> str:
    """ns N must not reach the coordinator's address; the root namespace must. A UDP echo
    server in ns C on 10.77.1.2 answers the root namespace; ns N must get no answer."""
    port = COORD_PORT + 1
    me = str(Path(__file__).resolve())
    echo = subprocess.Popen(
        ["ip", "netns", "exec", net.ns_c, sys.executable, me, "--worker", "echo",
         "--addr", f"{C_NS}:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert echo.stdout is not None
        line = echo.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the echo server in {net.ns_c} did not start: {line}")
        from_root = _udp_probe((C_NS, port))
        probe = subprocess.run(
            ["ip", "netns", "exec", net.ns_n, sys.executable, me, "--worker", "probe",
             "--addr", f"{C_NS}:{port}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        from_n = probe.stdout.strip() or probe.stderr.strip()
    finally:
        echo.kill()
        echo.wait(timeout=10)
    if from_root != "echo":
        raise RuntimeError(f"the root namespace cannot reach {C_NS}:{port}: {from_root}")
    if from_n == "echo":
        raise RuntimeError(f"{net.ns_n} reaches {C_NS} directly: the WAN would be bypassed")
    return (
        f"UDP to {C_NS}:{port} (echo server in ns C): root namespace -> echo; "
        f"ns N -> {from_n}; ns N routes: {net.routes(net.ns_n)}"
    )


def _echo_worker(addr: tuple[str, int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(addr)
        s.settimeout(30)
        print("ready", flush=True)
        with contextlib.suppress(OSError):
            while True:
                data, peer = s.recvfrom(64)
                s.sendto(data, peer)


# ---------------------------------------------------------------------------- the proxy


async def _proxy_main(args: argparse.Namespace) -> None:
    from netsim import LinkSpec, WanProxy

    spec = LinkSpec(delay_s=args.delay_ms / 1000, rate_bps=args.rate_mbit * 1e6, loss=args.loss)
    host, _, port = args.addr.rpartition(":")
    thost, _, tport = args.target.rpartition(":")
    proxy = await WanProxy((host, int(port)), (thost, int(tport)), spec, seed=args.seed).start()
    a = proxy.address
    print(f"listening {a[0]}:{a[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def kernel_drops() -> int:
        """Datagrams the kernel dropped because the proxy's sockets' receive buffers were full
        (the ``drops`` column of /proc/net/udp): loss the simulated link did not decide."""
        ports = set()
        for transport in proxy.transports():
            ports.add(transport.get_extra_info("sockname")[1])
        total = 0
        with contextlib.suppress(OSError):
            for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) in ports:
                    total += int(f[-1])
        return total

    def stats() -> dict[str, int]:
        return {
            "kernel_drops": kernel_drops(),
            "up_forwarded": proxy.up.stats.forwarded,
            "up_dropped": proxy.up.stats.dropped,
            "up_bytes": proxy.up.stats.bytes,
            "down_forwarded": proxy.down.stats.forwarded,
            "down_dropped": proxy.down.stats.dropped,
            "down_bytes": proxy.down.stats.bytes,
        }

    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 5)
            print(" ".join(f"{k}={v}" for k, v in stats().items()), flush=True)
    finally:
        proxy.close()
        c.write_json(Path(args.out), stats())


# ---------------------------------------------------------------------------- a node


def _node_worker(args: argparse.Namespace, setup: c.Setup) -> None:
    c.configure_torch(setup)
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_drift import DriftStrategy

    class Slowdown(Callback):
        """A node ``factor`` times slower than it is: after every batch it sleeps
        ``factor - 1`` times what the batch took to train (the strategy's waits left out), so
        the ratio holds however busy the machine is. Its calibration does not see the sleep,
        just as it would not see a slow data loader or a throttled GPU."""

        def __init__(self, factor: float) -> None:
            self.factor = factor
            self.t0 = self.busy0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.t0, self.busy0 = time.perf_counter(), trainer.strategy.busy_s

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            took = time.perf_counter() - self.t0 - (trainer.strategy.busy_s - self.busy0)
            time.sleep(max(0.0, (self.factor - 1.0) * took))

    class Utilization(Callback):
        """Training-step time: from the end of the previous batch (or the epoch's start) to the
        end of this one (loading, forward, backward, optimizer step, a Slowdown's sleep), less
        what the strategy spent inside it waiting for a round, handing off or applying."""

        def __init__(self) -> None:
            self.train_s = 0.0
            self.samples = 0
            self.t = self.busy = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.t, self.busy = time.perf_counter(), trainer.strategy.busy_s

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now, busy = time.perf_counter(), trainer.strategy.busy_s
            self.train_s += (now - self.t) - (busy - self.busy)
            self.t, self.busy = now, busy
            self.samples += len(batch[0])

    data = c.make_data(setup)
    model = c.make_model(setup)
    overlap = {"overlap": True, "blocking": False}[args.mode]
    strategy = DriftStrategy(
        token=args.token, name=args.name, coordinator_addr=args.via, overlap=overlap
    )
    util = Utilization()
    # The slowdown first: its sleep is part of this node's training steps.
    callbacks = ([Slowdown(args.slowdown)] if args.slowdown > 1 else []) + [util]
    trainer = L.Trainer(
        strategy=strategy, max_epochs=args.epochs, callbacks=callbacks, **c.trainer_kwargs()
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - t0
    out = Path(args.out)
    c.save_weights(model, out / "final.safetensors")
    c.write_json(
        out / "report.json",
        {
            "fit_s": fit_s,
            "train_s": util.train_s,
            "samples": util.samples,
            "steps": trainer.global_step,
            "timing": strategy.timing,
            "history": msgspec.to_builtins(strategy.history),
        },
    )


# ---------------------------------------------------------------------------- one profile


def _launch(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=c.child_env(), cwd=c.ROOT
    )


def _coordinator(
    net: Net, base: Path, bind: str, args: argparse.Namespace, setup: c.Setup, mode: str
):
    from lightning_drift_cli.local import LocalCoordinator

    class NsCoordinator(LocalCoordinator):
        def command(self) -> list[str]:
            return ["ip", "netns", "exec", net.ns_c, *super().command()]

    return NsCoordinator(
        base / "coord",
        port=COORD_PORT,
        bind=bind,
        min_nodes=args.nodes,
        epochs=args.epochs,
        batch_size=setup.batch_size,
        sync_every=args.sync_every,
        quorum=1.0,
        seed=setup.seed,
        overlap=mode == "overlap",
    )


def _wait_line(proc: subprocess.Popen[bytes], log: Path, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"no '{prefix}' line from {log}:\n{c.tail(log)}")


@dataclass(frozen=True)
class Case:
    """One run: a link profile, overlapped or blocking rounds, equal nodes or a 1x/Nx pair."""

    profile: Profile
    mode: str  # "overlap" | "blocking"
    slowdown: float = 1.0  # node-1 trains this many times slower (1: equal nodes)

    @property
    def name(self) -> str:
        pair = f"-1x{self.slowdown:g}x" if self.slowdown > 1 else ""
        return f"{self.profile.name}-{self.mode}{pair}"

    @property
    def hetero(self) -> bool:
        return self.slowdown > 1


def run_case(
    net: Net, case: Case, args: argparse.Namespace, setup: c.Setup, work: Path
) -> dict[str, Any]:
    prof = case.profile
    base = work / case.name
    shutil.rmtree(base, ignore_errors=True)  # a coordinator would resume an old state dir
    base.mkdir(parents=True)
    me = str(Path(__file__).resolve())
    res: dict[str, Any] = {
        "case": case.name,
        "profile": prof.name,
        "mode": case.mode,
        "slowdown": case.slowdown,
        "link": prof.describe(),
    }
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    proxy: subprocess.Popen[bytes] | None = None
    if prof.proxied:
        res["isolation"] = check_isolation(net, work)
        bind, via = C_NS, None
    else:
        net.add_direct()
        bind, via = D_C, None
    coord = _coordinator(net, base, bind, args, setup, case.mode)
    try:
        coord.start(timeout=120)
        if prof.proxied:
            plog = base / "proxy.log"
            proxy = _launch(
                [sys.executable, me, "--worker", "proxy", "--addr", f"{N_ROOT}:0",
                 "--target", f"{C_NS}:{COORD_PORT}", "--delay-ms", str(prof.delay_ms),
                 "--rate-mbit", str(prof.rate_mbit), "--loss", str(prof.loss),
                 "--seed", str(setup.seed), "--out", str(base / "proxy.json")],
                plog,
            )  # fmt: skip
            via = _wait_line(proxy, plog, "listening ", 30)
        link0 = net.node_link(direct=not prof.proxied)
        t0 = time.perf_counter()
        for i in range(args.nodes):
            out = base / f"node-{i}"
            out.mkdir(parents=True, exist_ok=True)
            log = base / f"node-{i}.log"
            slowdown = case.slowdown if i == 1 else 1.0
            cmd = ["ip", "netns", "exec", net.ns_n, sys.executable, me, "--worker", "node",
                   "--out", str(out), "--epochs", str(args.epochs), "--token", coord.token,
                   "--name", f"node-{i}", "--mode", case.mode, "--slowdown", str(slowdown),
                   *setup.argv()]  # fmt: skip
            if via:
                cmd += ["--via", via]
            procs.append((f"{case.name} node-{i}", _launch(cmd, log), log))
        try:
            c.wait_all(procs, args.timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n\ncoordinator log:\n{coord.log_tail()}") from None
        res["wall_s"] = time.perf_counter() - t0
        link1 = net.node_link(direct=not prof.proxied)
        link = {k: link1[k] - link0[k] for k in link1}
        res["link_bytes"] = link["bytes"]
        res["link_counters"] = link
        with contextlib.suppress(subprocess.TimeoutExpired):
            coord.wait(timeout=60)
        final_ckpt = coord.latest_checkpoint()
        replans = coord.log_path.read_text(errors="replace").count("apart at measured rates")
    finally:
        for _, p, _ in procs:
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)
        if proxy is not None:
            proxy.terminate()
            try:
                proxy.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait(timeout=10)
        coord.stop()
        if not prof.proxied:
            net.remove_direct()
    reports = [c.read_json(base / f"node-{i}" / "report.json") for i in range(args.nodes)]
    final = c.load_weights(final_ckpt)
    same = []
    for i in range(args.nodes):
        mine = c.load_weights(base / f"node-{i}" / "final.safetensors")
        same.append(mine.keys() == final.keys() and all(mine[k].equal(final[k]) for k in final))
    waits = [sum(e["wait_s"] for e in r["history"]) for r in reports]
    barriers = [len(r["history"]) for r in reports]
    samples = [r["samples"] for r in reports]
    res.update(
        fit_s=[r["fit_s"] for r in reports],
        train_s=[r["train_s"] for r in reports],
        utilization=[r["train_s"] / r["fit_s"] for r in reports],
        share=[n / max(1, sum(samples)) for n in samples],
        speed=[r["samples"] / max(1e-9, r["train_s"]) for r in reports],
        timing=[r["timing"] for r in reports],
        wait_s=waits,
        barriers=barriers,
        replans=replans,
        # round 0 takes the first upload only: the others are discarded by design
        missed=sum(
            1 for r in reports for e in r["history"] if e["round"] > 0 and not e["contributed"]
        ),
        wait_per_barrier=statistics.mean(
            w / max(1, b) for w, b in zip(waits, barriers, strict=True)
        ),
        payload=sum(e["bytes_sent"] + e["bytes_received"] for r in reports for e in r["history"]),
        rounds=max((e["round"] for r in reports for e in r["history"]), default=0),
        steps=[r["steps"] for r in reports],
        bit_equal=all(same),
        checkpoint=final_ckpt.name,
    )
    if proxy is not None:
        px = res["proxy"] = c.read_json(base / "proxy.json")
        # Datagrams lost outside the simulated link: the proxy's socket buffers overflowed.
        res["unmodelled"] = px["kernel_drops"]
    return res


# ---------------------------------------------------------------------------- report


def _pair(values: list[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


def report(args: argparse.Namespace, setup: c.Setup, results: list[dict], isolation: str) -> str:
    headers = [
        "profile", "link", "mode", "nodes", "utilization", "share", "speed", "fit s", "training s",
        "waiting s", "start-up s", "re-plans", "node link MiB", "proxy dropped",
        "lost outside proxy", "final == ckpt",
    ]  # fmt: skip
    rows = []
    for r in results:
        start = [t["startup_s"] for t in r["timing"]]
        row = [
            r["profile"],
            r["link"],
            r["mode"],
            "1x / " + f"{r['slowdown']:g}x" if r["slowdown"] > 1 else "equal",
            _pair(r["utilization"]),
            _pair(r["share"]),
            _pair(r["speed"], "{:.0f}"),
            _pair(r["fit_s"], "{:.0f}"),
            _pair(r["train_s"], "{:.0f}"),
            _pair(r["wait_s"], "{:.1f}"),
            _pair(start, "{:.1f}"),
            str(r["replans"]),
            f"{r['link_bytes'] / 2**20:.1f}",
        ]
        p = r.get("proxy")
        if p:
            dropped = p["up_dropped"] + p["down_dropped"]
            sent = dropped + p["up_forwarded"] + p["down_forwarded"]
            row += [f"{dropped} ({dropped / max(1, sent):.1%})", str(r["unmodelled"])]
        else:
            row += ["-", "-"]
        row.append("yes" if r["bit_equal"] else "NO")
        rows.append(row)
    lines = [c.table(headers, rows), ""]
    first = results[0] if results else None
    lines.append(
        f"- Setup: {setup.describe()}; {args.epochs} epoch(s), {args.nodes} nodes, "
        f"--sync-every {args.sync_every} ({first['rounds'] if first else '?'} rounds + the "
        "start-up sync), --quorum 1.0; coordinator in ns C, nodes in ns N."
    )
    lines.append(
        "- utilization: each node's training-step time over its `trainer.fit` wall time. "
        "Training-step time is the sum over its batches of the time from the previous batch's "
        "end (or the epoch's start) to this batch's end (loading, forward, backward, optimizer "
        "step), less what the strategy spent inside them waiting for a round, handing off an "
        "upload or applying global weights (`strategy.busy_s`). The fit's wall time also holds "
        "the start-up (join, calibration, start-up sync), the epoch's last (blocking) barrier "
        "and the teardown, so they count against it."
    )
    lines.append(
        "- share: each node's part of the samples trained; speed: its samples per second of "
        "training (the re-plans aim at shares in the ratio of the speeds); waiting s: the summed `wait_s` of "
        "`strategy.history` (time blocked for a round); start-up s: join, calibration and the "
        "start-up sync (`strategy.timing`); re-plans: how often the coordinator moved work "
        "between the nodes."
    )
    lines.append(
        f"- 1x / {args.slowdown:g}x: node-1 sleeps {args.slowdown - 1:g} times its own step "
        "time after every batch (its calibration does not see it), so it trains "
        f"{args.slowdown:g} times slower than node-1 would."
    )
    lines.append(
        "- node link: rx+tx bytes of the veth in ns N; proxy dropped: datagrams the simulated "
        "link dropped (loss or full queue); lost outside proxy: datagrams the kernel dropped "
        "at the proxy's full receive buffers (`/proc/net/udp`)."
    )
    lines.append(
        "- Weights payload per run (sum over nodes of safetensors bytes up and down): "
        + ", ".join(f"{r['case']} {c.fmt_bytes(r['payload'])}" for r in results)
        + "; uploads discarded for missing a round (after round 0): "
        + ", ".join(f"{r['case']} {r['missed']}" for r in results)
        + "."
    )
    lines.append(f"- Isolation check: {isolation}.")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """The last line: the lower node's utilization per profile, equal nodes, both modes."""
    parts = []
    for mode in ("overlap", "blocking"):
        figs = [
            f"{r['profile']} {min(r['utilization']):.2f}"
            for r in results
            if r["mode"] == mode and r["slowdown"] <= 1
        ]
        if figs:
            parts.append(f"{mode} " + ", ".join(figs))
    return "wan: utilization " + "; ".join(parts)


def summary_pair(results: list[dict]) -> str | None:
    pairs = [r for r in results if r["slowdown"] > 1]
    if not pairs:
        return None
    return "wan: 1x/{:g}x pair ".format(pairs[0]["slowdown"]) + "; ".join(
        f"{r['profile']} {r['mode']} utilization {_pair(r['utilization'])}, share "
        f"{_pair(r['share'])}, speed ratio {r['speed'][0] / max(1e-9, r['speed'][1]):.1f}"
        for r in pairs
    )


# ---------------------------------------------------------------------------- sizing


def step_seconds(setup: c.Setup, steps: int = 40, warmup: int = 5) -> float:
    """Seconds one training step of ``setup``'s char-LM takes here, now: a plain Lightning fit
    of a few dozen batches (the nodes' loader and Lightning's own per-step work included)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    c.configure_torch(setup)

    class Clock(Callback):
        def __init__(self) -> None:
            self.t0 = self.t1 = 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == warmup - 1:
                self.t0 = time.perf_counter()
            self.t1 = time.perf_counter()

    probe = replace(setup, max_chars=min(setup.max_chars, 400_000), stride=0)
    clock = Clock()
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=warmup + steps,
        callbacks=[clock],
        accelerator="cpu",
        **c.trainer_kwargs(),
    )
    trainer.fit(c.make_model(probe), datamodule=c.make_data(probe))
    return (clock.t1 - clock.t0) / steps


def probe_steps(setup: c.Setup, nodes: int) -> float:
    """Seconds per optimizer step when ``nodes`` processes train at once, as the nodes will:
    the slowest of ``nodes`` probe processes started together."""
    me = str(Path(__file__).resolve())
    cmd = [sys.executable, me, "--worker", "steps", *setup.argv()]
    procs = [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=c.child_env(),
            cwd=c.ROOT,
        )
        for _ in range(nodes)
    ]
    times = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"the step-time probe failed: {out}")
        times.append(float(out.split()[-1]))
    return max(times)


def size_run(setup: c.Setup, nodes: int, train_s: float, rounds: int) -> tuple[c.Setup, int, str]:
    """A Setup and --sync-every that make each of ``nodes`` train about ``train_s`` seconds in
    about ``rounds`` rounds, from the step time measured now; and a line saying so."""
    from lightning_drift_examples.charlm.data import load_text

    step = probe_steps(setup, nodes)
    steps = max(rounds, round(train_s / step))  # per node
    windows = steps * nodes * setup.batch_size
    available = len(load_text(None))  # the standard library's top-level source
    # Windows every `stride` bytes of the 90 % of the text used for training.
    stride = setup.stride or setup.block_size
    stride = max(1, min(stride, int(available * 0.9 / windows)))
    chars = min(available, int((windows * stride + setup.block_size + 1) / 0.9) + 1)
    sized = replace(setup, max_chars=chars, stride=stride)
    sync_every = max(1, steps // rounds)
    note = (
        f"a step took {step * 1000:.0f} ms with {nodes} processes training at once when the "
        f"run started: {steps} steps per node "
        f"(~{train_s:g} s of training) from {chars} bytes, a window every {stride} bytes, "
        f"--sync-every {sync_every}"
    )
    return sized, sync_every, note


# ---------------------------------------------------------------------------- main


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    c.Setup.add_args(ap, **DEFAULTS)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument(
        "--sync-every",
        type=int,
        default=DEFAULT_SYNC_EVERY,
        help=f"steps per round (default {DEFAULT_SYNC_EVERY})",
    )
    ap.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated subset")
    ap.add_argument("--modes", default="overlap,blocking", help="overlap, blocking or both")
    ap.add_argument(
        "--pair-profiles",
        default="wan",
        help="profiles that also run a 1x/Nx pair of nodes (default wan; '' for none)",
    )
    ap.add_argument("--slowdown", type=float, default=3.0, help="N of the 1x/Nx pair")
    ap.add_argument(
        "--train-seconds",
        type=float,
        default=TRAIN_SECONDS,
        help=f"size the data so each node trains about this long in --rounds rounds, from a "
        f"step-time probe (default {TRAIN_SECONDS:g}); 0: use --max-chars, --stride and "
        "--sync-every as given",
    )
    ap.add_argument("--rounds", type=int, default=ROUNDS, help=f"default {ROUNDS}")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--workdir", type=Path, default=None, help="keep logs and weights here")
    # internal: the processes this benchmark starts
    ap.add_argument(
        "--worker", choices=("node", "proxy", "echo", "probe", "steps"), help=argparse.SUPPRESS
    )
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--token", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="node", help=argparse.SUPPRESS)
    ap.add_argument("--via", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="overlap", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--rate-mbit", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--loss", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup = c.Setup.from_args(args)
    if args.worker == "node":
        _node_worker(args, setup)
        return
    if args.worker == "proxy":
        asyncio.run(_proxy_main(args))
        return
    if args.worker == "steps":
        print(step_seconds(setup), flush=True)
        return
    if args.worker in ("echo", "probe"):
        host, _, port = args.addr.rpartition(":")
        if args.worker == "echo":
            _echo_worker((host, int(port)))
        else:
            print(_udp_probe((host, int(port))), flush=True)
        return

    def names(text: str, known: Any, what: str) -> list[str]:
        chosen = [x.strip() for x in text.split(",") if x.strip()]
        unknown = set(chosen) - set(known)
        if unknown:
            ap.error(f"unknown {what} {sorted(unknown)}; choose from {', '.join(known)}")
        return chosen

    profiles = names(args.profiles, PROFILES, "profiles")
    modes = names(args.modes, ("overlap", "blocking"), "modes")
    pairs = names(args.pair_profiles, PROFILES, "pair profiles")
    if args.slowdown < 1:
        ap.error("--slowdown must be at least 1")
    cases = [Case(PROFILES[p], m) for m in modes for p in profiles]
    cases += [Case(PROFILES[p], m, args.slowdown) for m in modes for p in pairs]
    sizing = "as given"
    if args.train_seconds > 0:
        setup, args.sync_every, sizing = size_run(
            setup, args.nodes, args.train_seconds, args.rounds
        )
        print(f"sizing: {sizing}", flush=True)

    net = Net()
    try:
        net.preflight()
    except Refused as exc:
        raise SystemExit(f"wan.py: {exc}") from None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="drift-wan-"))
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    results: list[dict[str, Any]] = []
    isolation = "not run (no proxied profile)"
    t_all = time.perf_counter()
    try:
        try:
            net.setup()
        except Refused as exc:
            raise SystemExit(f"wan.py: {exc}") from None
        for case in cases:
            print(f"running {case.name} ({case.profile.describe()}) ...", flush=True)
            res = run_case(net, case, args, setup, work)
            isolation = res.get("isolation", isolation)
            print(
                f"  {case.name}: utilization {_pair(res['utilization'])}, share "
                f"{_pair(res['share'])}, fit {_pair(res['fit_s'], '{:.0f}')} s, waiting "
                f"{_pair(res['wait_s'], '{:.1f}')} s, rounds {res['rounds']}, re-plans "
                f"{res['replans']}, final == checkpoint: {res['bit_equal']}",
                flush=True,
            )
            results.append(res)
            c.write_json(work / "results.json", results)
    except KeyboardInterrupt:
        print("wan.py: interrupted; removing namespaces and processes", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        net.close()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"```\n{c.command_line()}\n```\n")
    print(report(args, setup, results, isolation))
    print(f"- Sizing: {sizing}.")
    print(f"- Whole run: {time.perf_counter() - t_all:.0f} s.")
    pair = summary_pair(results)
    if pair:
        print(f"\n{pair}")
    print(f"\n{summary(results)}")
    if any(not r["bit_equal"] for r in results):
        raise SystemExit("wan.py: a node did not end on the coordinator's final checkpoint")


if __name__ == "__main__":
    main()
