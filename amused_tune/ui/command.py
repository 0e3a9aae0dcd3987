"""`amused-tune ui [--runs runs/] [--port 7860] [--host 127.0.0.1] [--share]`: the local web page (docs/ui.md).

It listens on 127.0.0.1 (this machine only) unless --host or --share says otherwise, and then says what that
exposes, asks for a login and takes paths only inside the runs folder and the --data folders (ui/access.py). Without gradio, a busy port or a runs path that is a file, it prints one line and exits 2."""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
from pathlib import Path

from amused_tune.cli.args import SubcommandParser, fail
from amused_tune.ui import access

PROG = "amused-tune ui"
INSTALL = 'the web page needs gradio: pip install "amused-tune[ui]"'
LOOPBACK = access.LOOPBACK


def build_parser() -> SubcommandParser:
    p = SubcommandParser(prog=PROG, description="A local web page to prepare, watch, compare and share runs.")
    p.add_argument("--runs", default="runs", help="the folder whose runs the page lists (new runs go where their "
                                                  "recipe's output.dir says; the recipes' default is runs/)")
    p.add_argument("--port", type=int, default=7860, help="the port to listen on")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on; 0.0.0.0 opens the page to every machine that can reach this one")
    p.add_argument("--share", action="store_true", help="also a public gradio.live link (anyone with it can train, "
                                                        "sample and push with your login)")
    p.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="a folder of training data the page may read when it is reachable from other machines "
                        "(--host, --share); repeat for more. Such a page takes paths only inside --runs and these")
    return p


def port_problem(host: str, port: int) -> str | None:
    """Why the page cannot listen on host:port (in use, not allowed, not an address here), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use: pass --port with a free one, or stop what listens there"
            if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:
                return f"--host {host} is not an address of this machine: leave it out (127.0.0.1) or pass 0.0.0.0"
            return f"cannot listen on {host}:{port} ({err.strerror or err}): pass --port with another one"
    return None


def exposure_warning(host: str, share: bool) -> str | None:
    if share:
        return ("warning: --share makes a public link: whoever has it and the password can start runs and push with "
                "your Hugging Face login; the page takes paths only inside --runs and the --data folders")
    if host not in LOOPBACK:
        return (f"warning: listening on {host}: any machine that reaches this one on the port can reach the page "
                "(it asks for the password); it takes paths only inside --runs and the --data folders; leave --host "
                "out to keep it on this machine")
    return None


def main(argv: list[str] | None = None) -> int:
    args, code = build_parser().parse_or_exit_code(list(sys.argv[1:] if argv is None else argv))
    if args is None:
        return code
    try:
        import gradio  # noqa: F401
    except ImportError:
        return fail(INSTALL, PROG)
    runs = Path(args.runs).expanduser()
    if runs.exists() and not runs.is_dir():
        return fail(f"--runs {args.runs} is a file: pass the folder that holds your runs", PROG)
    data = [Path(d).expanduser() for d in args.data]
    missing = next((d for d in data if not d.is_dir()), None)
    if missing is not None:
        return fail(f"--data {missing} is not a folder: pass a folder of training data", PROG)
    problem = port_problem(args.host, args.port)
    if problem:
        return fail(problem, PROG)
    warning = exposure_warning(args.host, args.share)
    if warning:
        print(warning, file=sys.stderr)
    password, made_up = access.login_password(args.host, args.share)
    if made_up:
        print(f"login: any user name, password {password} (set {access.PASSWORD_ENV} to choose it)", flush=True)
    return serve(runs, args.host, args.port, args.share, data, password)


MAX_UPLOAD = "200mb"  # one uploaded file at most (gradio refuses larger before the page sees it)


def serve(runs: Path, host: str, port: int, share: bool, data: list[Path] | None = None,
          password: str | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    runs.mkdir(parents=True, exist_ok=True)
    # gradio keeps what it receives and serves in its own folder: under the runs folder, so that nothing the page is
    # sent lands anywhere else
    os.environ["GRADIO_TEMP_DIR"] = str((runs / ".ui" / "gradio").resolve())
    from amused_tune.ui.layout import build

    page_access = access.Access(runs, list(data or []), confined=access.remote(host, share))
    demo = build(runs, page_access)
    threading.Thread(target=_warm_up, daemon=True).start()
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    print(f"amused-tune ui: {url} (runs in {runs}; Ctrl-C stops the page, not the runs it started)", flush=True)
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=host, server_port=port, share=share, quiet=True, show_error=False,
            allowed_paths=[str(runs.resolve())], footer_links=[], css=_css(), max_file_size=MAX_UPLOAD,
            auth=access.checker(password) if password else None,
            auth_message="amused-tune: the password was printed where the page was started "
                         f"(or is {access.PASSWORD_ENV})")
    except KeyboardInterrupt:
        return 0
    except OSError as err:  # lost the port between the check and the start
        return fail(f"cannot listen on {host}:{port} ({err}): pass --port with a free one", PROG)
    return 0


def _warm_up() -> None:
    """Import what the buttons need (torch, the sampler) while the page is already up, so that the first poll
    of a training run and the first Compare do not wait for it."""
    import importlib

    for name in ("amused_tune.train.outputs", "amused_tune.cli.sample", "amused_tune.cli.args"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a failing import shows, with its message, when the button is used
            pass


def _css() -> str:
    from amused_tune.ui.app import CSS

    return CSS
