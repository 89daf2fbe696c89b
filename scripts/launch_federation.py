#!/usr/bin/env python3
"""Start, inspect and stop a federation of real Flower processes on this machine.

One SuperLink and N SuperNodes, with TLS (certificates from scripts/make_certs.py), SuperNode
authentication (one ECDSA P-384 key per node, registered with `flwr supernode register`), each
node with its own data and its own `state-dir`, and a `flwr` connection in
`<dir>/flwr-home/config.toml`:

    python scripts/launch_federation.py start --dir fed --nodes 3
    FLWR_HOME=fed/flwr-home flwr run . bayesfl --stream --run-config "num-server-rounds=3"
    python scripts/launch_federation.py status --dir fed
    python scripts/launch_federation.py stop --dir fed

The Flower release is the one installed beside the Python that runs this script (or
`--bin-dir`): flwr 1.36 and older speak gRPC on the Fleet API (separate Fleet, Control and
Runtime ports); 1.37 and newer serve Fleet, Control and Runtime APIs over HTTPS on one port.
The processes themselves are managed by `scripts/federation.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: `scripts` is not importable yet
    sys.path.insert(0, str(REPO))

from scripts.federation import Federation, FederationError, alive  # noqa: E402


def cmd_start(args: argparse.Namespace) -> None:
    fed = Federation.create(
        args.dir, args.nodes, args.bin_dir, data_paths=args.data_path, bind=args.bind,
        extra_names=args.name, connection=args.connection,
    )
    try:
        fed.start(timeout=args.timeout)
    except BaseException:
        fed.stop()
        fed.remove_state()
        raise
    transport = "gRPC (grpc-rere)" if fed.spec.grpc_fleet else "HTTPS"
    version = ".".join(map(str, fed.spec.version))
    print(f"Federation up in {fed.root}: flwr {version}, Fleet API over {transport}, "
          f"SuperNodes dial {fed.fleet_address}, CLI dials {fed.control_address}")
    for node in fed.spec.nodes:
        print(f"  node-{node.index}: pid {node.pid}, SuperNode ID {fed.node_id(node.index)}, "
              f"node config {node.node_config}")
    print(f"Run the app:  FLWR_HOME={fed.flwr_home} {fed.bin_dir / 'flwr'} run . "
          f"{fed.spec.connection} --stream")
    print(f"Stop:         {sys.executable} {Path(__file__).resolve()} stop --dir {fed.root}")


def cmd_status(args: argparse.Namespace) -> None:
    fed = Federation.load(args.dir)
    running = {True: "running", False: "stopped"}
    print(f"superlink: {running[alive(fed.spec.superlink_pid)]} (pid {fed.spec.superlink_pid}), "
          f"connection '{fed.spec.connection}' at {fed.control_address}, FLWR_HOME={fed.flwr_home}")
    for node in fed.spec.nodes:
        print(f"node-{node.index}: {running[alive(node.pid)]} (pid {node.pid}), "
              f"SuperNode ID {fed.node_id(node.index)}")
    if alive(fed.spec.superlink_pid):
        print(fed.flwr("supernode", "list", fed.spec.connection).stdout)


def cmd_stop(args: argparse.Namespace) -> None:
    fed = Federation.load(args.dir)
    if args.node is None:
        fed.stop()
        fed.remove_state()
        print(f"Stopped every process of {fed.root}")
    else:
        fed.stop_node(args.node, crash=args.kill)
        print(f"Stopped node-{args.node}")


def cmd_restart_node(args: argparse.Namespace) -> None:
    fed = Federation.load(args.dir)
    print(f"Starting node-{args.node}; after a crash the SuperLink first has to count it "
          "offline (up to 60 s)", flush=True)
    fed.start_node(args.node, timeout=args.timeout)
    print(f"node-{args.node} running (pid {fed.node(args.node).pid}), SuperNode ID {fed.node_id(args.node)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    start = sub.add_parser("start", help="create and start a federation, wait until every node is online")
    start.add_argument("--dir", type=Path, required=True, help="folder for certificates, keys, logs and state")
    start.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (default 3)")
    start.add_argument("--data-path", action="append",
                       help="one per node, in order: the node trains on this .npz or save_to_disk folder "
                            "instead of partition <i> of the run's data set")
    start.add_argument("--bin-dir", type=Path, default=Path(sys.executable).parent,
                       help="folder with flower-superlink, flower-supernode and flwr "
                            "(default: beside this Python)")
    start.add_argument("--bind", default="127.0.0.1",
                       help="address the SuperLink listens on (0.0.0.0 to accept other machines)")
    start.add_argument("--name", action="append",
                       help="extra DNS name or IP for the server certificate (repeatable)")
    start.add_argument("--connection", default="bayesfl", help="name of the flwr connection")
    start.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for start-up")
    start.set_defaults(func=cmd_start)

    status = sub.add_parser("status", help="which processes run, and the SuperLink's node list")
    status.add_argument("--dir", type=Path, required=True)
    status.set_defaults(func=cmd_status)

    stop = sub.add_parser("stop", help="stop everything (or one node with --node)")
    stop.add_argument("--dir", type=Path, required=True)
    stop.add_argument("--node", type=int, help="stop only this node (index from 0)")
    stop.add_argument("--kill", action="store_true", help="with --node: SIGKILL, as if the machine died")
    stop.set_defaults(func=cmd_stop)

    restart = sub.add_parser("start-node", help="start a stopped node again with its key and state-dir")
    restart.add_argument("--dir", type=Path, required=True)
    restart.add_argument("--node", type=int, required=True)
    restart.add_argument("--timeout", type=float, default=120.0)
    restart.set_defaults(func=cmd_restart_node)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except FederationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
