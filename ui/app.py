"""The IRA Gradio app: `build_app` lays out the tabs; `launch_app` serves it (locally, or shared)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no telemetry calls from an offline app

import gradio as gr  # noqa: E402

from ira.config import load_config  # noqa: E402
from ira.hardware import HardwareInfo, detect_hardware  # noqa: E402
from ui.data_tab import build_data_tab  # noqa: E402
from ui.generate_tab import build_generate_tab  # noqa: E402
from ui.header import build_header, resolve_preset  # noqa: E402
from ui.login_guard import server_options  # noqa: E402
from ui.runner import JobRunner  # noqa: E402
from ui.style_tab import build_style_tab  # noqa: E402
from ui.train_tab import build_train_tab  # noqa: E402
from ui.workspace import Workspace, keep_gradio_files_in  # noqa: E402

QUEUE_SIZE = 64


def build_app(workspace: str | Path | Workspace = "workspace", preset: str = "auto",
              overrides: Optional[list[str]] = None, runner: Optional[JobRunner] = None,
              hardware: Optional[HardwareInfo] = None) -> gr.Blocks:
    """The Blocks app on `workspace` (created if missing) with the `preset` config plus `overrides`; Gradio's
    uploads and served files go to workspace/gradio_cache (`keep_gradio_files_in`: one workspace per process).

    Each event has its own queue slot (Gradio's default concurrency limit is 1 *per event*), so a
    corpus build never holds up the Train tab; builds are serialised among themselves, and the
    status timer has no limit.
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace.create(workspace)
    keep_gradio_files_in(ws)   # before any component exists: each reads its cache folder when it is made
    hardware = hardware or detect_hardware()
    requested = (preset or "auto").strip().lower()
    chosen = resolve_preset(requested, hardware)
    overrides = list(overrides or [])
    load_config(chosen, overrides)   # a bad preset or override fails here, before any UI exists
    runner = runner or JobRunner(ws.runs_dir)
    with gr.Blocks(title="IRA") as demo:
        build_header(hardware, chosen, requested)
        with gr.Tabs():
            with gr.Tab("Data"):
                data = build_data_tab(ws, chosen, overrides)
            with gr.Tab("Train") as train_tab:
                train = build_train_tab(demo, ws, runner, chosen, overrides)
            with gr.Tab("Voice Style") as style_tab:
                style = build_style_tab(ws, chosen, overrides, device=hardware.device)
            with gr.Tab("Generate") as generate_tab:
                generate = build_generate_tab(ws, device=hardware.device)
        style_lists = [style.checkpoint, style.corpus]
        style_tab.select(style.refresh_lists, style_lists, style_lists, api_visibility="private")
        generate_picks = [generate.checkpoint, generate.offered]
        generate_tab.select(generate.refresh_lists, generate_picks, generate_picks, api_visibility="private")
        lists = [train.corpus, train.prerequisite]
        data.built.success(train.refresh_lists, [*lists, train.stage], lists, api_visibility="private")
        train_tab.select(train.refresh_lists, [*lists, train.stage], lists, api_visibility="private")
        # the Data tab's list as of now, not as of the app's start (corpora built since then are listed)
        demo.load(data.refresh, data.corpus, data.corpus, api_visibility="private")
    demo.queue(max_size=QUEUE_SIZE)
    demo.ira_workspace = ws   # launch_app serves files from here (gr.Audio)
    return demo


def parse_auth(values: Optional[list[str]]) -> Optional[list[tuple[str, str]]]:
    """['user:pass', ...] -> [(user, pass), ...]; a malformed value is a ValueError saying the format."""
    if not values:
        return None
    pairs = []
    for value in values:
        user, sep, password = value.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"--auth {value!r} is not user:password (both parts non-empty, e.g. "
                             "--auth alice:s3cret); the password may contain ':'")
        pairs.append((user.strip(), password))
    return pairs


@dataclass
class Launched:
    local_url: str
    share_url: Optional[str]
    messages: list[str]


def launch_app(demo: gr.Blocks, *, host: str = "127.0.0.1", port: Optional[int] = None, share: bool = False,
               auth: Optional[list[tuple[str, str]]] = None, prevent_thread_lock: bool = False,
               quiet: bool = False) -> Launched:
    """Serve `demo`. A share link that cannot be made (offline, firewall) leaves the app serving
    locally with a message; it never stops the app. With `auth`, only the login page answers without a
    login (`ui.login_guard`)."""
    messages: list[str] = []

    def say(message: str) -> None:
        messages.append(message)
        print(f"[ira] {message}", file=sys.stderr, flush=True)

    if share and not auth:
        say("WARNING: --share without --auth: anyone with the public link can use this app, train on "
            "this machine and read the workspace. Add --auth user:password.")
    ws: Workspace = demo.ira_workspace
    kwargs = dict(server_name=host, server_port=port, auth=auth, allowed_paths=[str(ws.root)],
                  prevent_thread_lock=True, show_error=True, quiet=quiet, ssr_mode=False,
                  auth_message="IRA: sign in with the user and password given to --auth" if auth else None)
    try:
        _, local_url, share_url = demo.launch(share=share, **kwargs, **server_options())
    except Exception as exc:
        if not share:
            raise
        say(f"could not create a public link ({type(exc).__name__}: {exc}); serving locally only")
        if demo.is_running:   # the server is up; only the tunnel failed
            local_url, share_url = demo.local_url, None
        else:
            _, local_url, share_url = demo.launch(share=False, **kwargs, **server_options())
    if share and not share_url:
        say(f"could not create a public --share link (no internet access, or the share server is "
            f"unreachable). The app keeps running locally at {local_url}")
    elif share_url:
        say(f"public link: {share_url}")
    if not prevent_thread_lock:
        demo.block_thread()
    return Launched(local_url=local_url, share_url=share_url, messages=messages)
