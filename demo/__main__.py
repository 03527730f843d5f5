"""``python -m demo`` (run by ``scripts/demo``): the whole system on one machine.

Starts the reference gateway (zero configuration, its data in a fresh directory), mints a
device credential, starts an agent that launches and supervises a CPU ComfyUI, imports the
sample workflow (``demo/workflow.json``), then acts as a platform user: uploads an input
picture through ``/r/files/presign``, runs the workflow with a parameter override, follows
the task's events with a progress bar, downloads the result through
``/r/tasks/{id}/result`` and says where it saved it. Then everything is stopped.

``--serve`` stops after the set-up and keeps the gateway and agent running until Ctrl-C,
printing the URLs, the credential and a ready-to-paste ``curl`` example.

Ctrl-C at any point stops every process the demo started (exit 130).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from demo.client import ApiError, Event, PlatformClient
from demo.png import size_of, write_sample
from demo.stack import AGENT_ID, Stack, StackError

WORKFLOW = Path(__file__).with_name("workflow.json")
TEAM = "demo"
AGENT_READY_S = 300.0
BAR = 30


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the exit code."""
    args = _parser().parse_args(argv)
    python, main_py = _comfyui(args)
    signal.signal(signal.SIGTERM, _interrupt)
    with _data_dir(args.data_dir, keep=args.keep or args.serve) as data_dir:
        stack = Stack(data_dir)
        try:
            return _run(args, stack, python, main_py)
        except KeyboardInterrupt:
            say("interrupted: stopping the agent and the gateway")
            return 130
        except (StackError, ApiError, TimeoutError) as exc:
            say(f"demo failed: {exc}")
            say(f"logs: {stack.log_dir}")
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the stop
            stack.stop()
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _run(args: argparse.Namespace, stack: Stack, python: Path, main_py: Path) -> int:
    started = time.monotonic()
    say("starting the reference gateway (SQLite + embedded storage)")
    url = stack.start_gateway(args.port)
    say(f"gateway listening on {url}")
    credential = stack.gateway_cli("credentials", "create", "--team", TEAM, "--kind", "device")
    say(f'team "{TEAM}": device credential {credential[:3]}… minted')
    say("starting the agent; it launches and supervises a CPU ComfyUI")
    stack.start_agent(url, credential, python, main_py)
    with PlatformClient(url, credential) as client:
        agent = _wait_agent(client, stack)
        say(
            f"agent {agent['agent_id']} ready ({', '.join(agent['agent_labels'])}) "
            f"after {time.monotonic() - started:.1f} s"
        )
        workflow = client.import_workflow(json.loads(WORKFLOW.read_text(encoding="utf-8")))
        keys = ", ".join(p["key"] for p in workflow["parameters"])
        say(
            f"imported workflow {workflow['id']} (slug {workflow['workflow_slug']}; "
            f"parameters: {keys})"
        )
        if args.serve:
            return _serve(client, stack, credential, workflow["id"])
        return _submit(client, args, workflow["id"], stack.data_dir)


def _wait_agent(client: PlatformClient, stack: Stack) -> dict[str, Any]:
    deadline = time.monotonic() + AGENT_READY_S
    while True:
        if stack.alive():
            raise StackError(f"{', '.join(stack.alive())} exited; see {stack.log_dir}")
        try:
            return client.wait_for_agent(AGENT_ID, "comfyui", timeout=2.0)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def _submit(client: PlatformClient, args: argparse.Namespace, workflow: str, data: Path) -> int:
    picture = write_sample(data / "input.png")
    width, height = size_of(picture.read_bytes())
    file_key = client.upload_input(picture, "image/png")
    say(f"uploaded {picture.name} ({width}x{height}) through /r/files/presign: {file_key}")
    parameters = {"image": file_key, "blur_radius": args.blur_radius}
    task_id = client.run(workflow, parameters)
    say(f"POST /api/v1/r/workflows/{workflow}/run {json.dumps(parameters)} -> task {task_id}")
    begun = time.monotonic()
    bar = ProgressBar()
    end = client.follow(task_id, bar.update)
    bar.close()
    if end.event != "completed":
        say(f"task {end.event}: {end.data.get('task_error') or end.data}")
        return 1
    result = client.result(task_id)
    saved = client.download(result, args.output.absolute() / task_id)
    say(
        f"task completed in {time.monotonic() - begun:.1f} s; "
        f"result through /r/tasks/{task_id}/result"
    )
    for path in saved:
        say(f"saved {path}")
    return 0


def _serve(client: PlatformClient, stack: Stack, credential: str, workflow: str) -> int:
    picture = write_sample(stack.data_dir / "input.png")
    file_key = client.upload_input(picture, "image/png")
    url = client.base_url
    api = f"{url}/api/v1"
    body = json.dumps({"parameters": {"image": file_key, "blur_radius": 6}})
    print(
        f"""
The gateway and the agent keep running until Ctrl-C.

  gateway     {url}   (REST under {api}, agent endpoint {url}/agent/v1/ws)
  credential  {credential}   (team "{TEAM}", a device credential)
  workflow    {workflow}   (parameters: image, width, blur_radius)
  input       {file_key}   (the sample picture, uploaded through /r/files/presign)
  logs        {stack.log_dir}

Run the workflow, follow it and fetch the result (paste into a shell):

  KEY={shlex.quote(credential)}
  TASK=$(curl -s -X POST {api}/r/workflows/{workflow}/run \\
      -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
      -d {shlex.quote(body)} | python3 -c 'import json,sys; print(json.load(sys.stdin)["task_id"])')
  curl -sN {api}/r/tasks/$TASK/events -H "Authorization: Bearer $KEY"
  curl -s {api}/r/tasks/$TASK/result -H "Authorization: Bearer $KEY"

Upload a picture of your own with POST {api}/r/files/presign, then PUT it to the upload_url
with the upload_headers it returns (see docs/gateway.md).
""",
        flush=True,
    )
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while not stack.alive():
        signal.sigtimedwait([signal.SIGCHLD], 5.0)  # wakes when a child exits
    say(f"{', '.join(stack.alive())} exited unexpectedly; see {stack.log_dir}")
    return 1


class ProgressBar:
    """The task's events as one redrawn line on a terminal, or a line per change elsewhere."""

    def __init__(self) -> None:
        """Draw on stdout."""
        self.tty = sys.stdout.isatty()
        self.last = ""

    def update(self, event: Event) -> None:
        """Show one event."""
        data = event.data
        if event.event == "status":
            line = f"status: {data.get('task_status')}"
        elif event.event == "progress":
            done = float(data.get("progress") or 0.0)
            filled = round(done * BAR)
            node = data.get("current_node")
            steps = (
                f" step {data['step_current']}/{data['step_total']}"
                if data.get("step_total")
                else ""
            )
            line = f"[{'#' * filled}{'-' * (BAR - filled)}] {done:4.0%}  node {node}{steps}"
        else:
            line = f"[{'#' * BAR}] {event.event}" if event.event == "completed" else event.event
        if line == self.last:
            return
        self.last = line
        if self.tty:
            print(f"\r\033[K{line}", end="", flush=True)
        else:
            print(f"    {line}", flush=True)

    def close(self) -> None:
        """End the redrawn line."""
        if self.tty and self.last:
            print(flush=True)


def say(text: str) -> None:
    """One line of the demo's narration."""
    print(f"==> {text}", flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    del signum, frame
    raise KeyboardInterrupt


@contextmanager
def _data_dir(path: Path | None, *, keep: bool) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.absolute()
        return
    made = Path(tempfile.mkdtemp(prefix="cyberun-demo-"))
    try:
        yield made
    finally:
        if keep:
            say(f"data kept in {made}")
        else:
            shutil.rmtree(made, ignore_errors=True)


def _comfyui(args: argparse.Namespace) -> tuple[Path, Path]:
    python = args.comfyui_python or os.environ.get("COMFYUI_PYTHON")
    main_py = args.comfyui_main or os.environ.get("COMFYUI_MAIN")
    if not python or not main_py:
        raise SystemExit(
            "demo: no ComfyUI: run ./scripts/demo (it installs one), or pass --comfyui-python "
            "and --comfyui-main (or set COMFYUI_PYTHON and COMFYUI_MAIN)"
        )
    return Path(python), Path(main_py)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description=__doc__.split("\n")[0] if __doc__ else None,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="set up, then keep gateway and agent running until Ctrl-C",
    )
    parser.add_argument("--port", type=int, default=0, help="gateway port (default: any free port)")
    parser.add_argument(
        "--blur-radius",
        type=int,
        default=4,
        help="the parameter override sent with the run (1-31; default 4)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("cyberun-demo-output"),
        help="where results are saved, per task (default ./cyberun-demo-output)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="gateway, agent and ComfyUI data (default: a temporary directory)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary data directory (logs) afterwards"
    )
    parser.add_argument("--comfyui-python", help="ComfyUI's interpreter (else $COMFYUI_PYTHON)")
    parser.add_argument("--comfyui-main", help="ComfyUI's main.py (else $COMFYUI_MAIN)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
