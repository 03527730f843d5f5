"""The commented ``cyberun-agent.yaml`` template that ``cyberun-agent config init`` writes."""

from __future__ import annotations

from agent.settings import Settings


def config_template(defaults: Settings) -> str:
    """Return the commented ``cyberun-agent.yaml`` template that ``config init`` writes.

    Lines starting with ``# `` are settings at their default (or an example, where a key
    has none); removing the ``# `` of every such line still gives a valid file.
    """
    return _TEMPLATE.format(
        state_dir=defaults.state_dir, work_dir=defaults.work_dir, cache_dir=defaults.cache_dir
    )


_TEMPLATE = """\
## cyberun-agent.yaml: configuration of the Cyberun GPU worker agent.
## Precedence: command-line flags > CYBERUN_AGENT_* environment > this file > defaults.
## "# key: value" lines show a setting at its default (or an example where there is no
## default): remove the "# " to set it. "##" lines explain. Nested keys are set from the
## environment with "__", e.g. CYBERUN_AGENT_TIMEOUTS__CONNECT_S=5.
## Reference: docs/configuration.md. Check with: cyberun-agent config validate

## Gateway base URL; the agent connects to <url>/agent/v1/ws (http->ws, https->wss).
## Required to run (no default). http:// and ws:// only for a loopback host.
# gateway_url: https://gateway.example.com
## Allow plain http:// or ws:// to a non-loopback host (traffic and credential unencrypted).
# allow_insecure_gateway: false

## The credential: an agent key (ak-...) or device credential (dk-...). Required to run.
## Precedence: credential > credential_file > systemd credential "cyberun-agent-credential"
## > <state_dir>/credential (written by `cyberun-agent login`).
## Prefer credential_file or CYBERUN_AGENT_CREDENTIAL; if you set it here, chmod 600 this file.
# credential: ak-REPLACE_WITH_YOUR_AGENT_KEY
## A file whose content (whitespace stripped) is the credential; keep it chmod 600.
# credential_file: /etc/cyberun-agent/credential

## This agent's id (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit).
## Default: generated once as <hostname>-<8 hex digits> and kept in <state_dir>/agent_id.
# agent_id: gpu-node-01
## Region hint for dispatch (trimmed, lower-cased, at most 64 characters); "" = unknown.
# region: ""
## Extra labels advertised to the gateway (lower-case a-z 0-9 . _ -), e.g. [team-a, gpu-h100].
# agent_labels: []
## Concurrent task slots (>= 1); null means auto: one per GPU.
# slots: null

## Pools: this agent always serves its team's pool; the community pool is opt-in.
# pools:
##  The team pool is always served; false is an error.
#   team: true
#   community:
##    Serve tasks from any team that targets the community pool.
#     enabled: false
##    At most this many community tasks at once (>= 1).
#     max_concurrent: 1
##    "HH:MM-HH:MM" windows in `timezone`, may wrap midnight, e.g. ["22:00-06:00"].
##    Empty: at any time.
#     hours: []
##    IANA time zone of `hours`, e.g. Europe/Berlin.
#     timezone: UTC
##    Take community tasks only while idle: no team task runs, every GPU is below
##    idle_max_utilization percent busy and (idle_check_processes) runs no process that
##    is not the agent's.
#     only_when_idle: false
#     idle_max_utilization: 10.0
#     idle_check_processes: true
##    Let team tasks preempt (cancel, reason "preempted", re-queued) community tasks.
#     preempt: false

## The policy engine: community tasks (and team tasks with team: true) are checked before
## they are accepted; a violation rejects them with policy_denied. See docs/community.md.
# policy:
#   team: false
##  Longest a policed task may run; a longer timeout is refused, none gets this one.
#   max_duration_s: 3600.0
#   comfyui:
##    Node classes allowed besides ComfyUI's built-in nodes, and built-ins refused anyway.
#     allow_nodes: []
#     deny_nodes: []
##    Limits on literal inputs (width/height, width x height, batch_size, steps, frames,
##    seconds, upscale factors).
#     max_side: 2048
#     max_pixels: 4194304
#     max_batch_size: 4
#     max_steps: 100
#     max_frames: 240
#     max_seconds: 60.0
#     max_scale: 4.0
##    Model files usable besides those in the agent's model cache.
#     allow_models: []
#   nerfstudio:
#     methods: [splatfacto, splatfacto-big, nerfacto, nerfacto-big, nerfacto-huge]
##    train.options / train.dataparser keys allowed; null = all the spec allows.
#     allow_options: null
#     max_iterations: 30000
#     max_points: 2000000
#     max_frames: 300

## Runtimes. ComfyUI: attach to a running instance with
##     url: http://127.0.0.1:8188
##     directory: /opt/ComfyUI   (its base directory; required with the community pool)
## or let the agent launch it (set url or launch, not both; neither disables ComfyUI):
# runtimes:
#   comfyui:
#     launch:
##      The Python interpreter of the ComfyUI installation (required).
#       python: /opt/ComfyUI/.venv/bin/python
##      ComfyUI's main.py (required).
#       main: /opt/ComfyUI/main.py
##      Extra arguments for main.py.
#       args: []
#       port: 8188
##      ComfyUI's --base-directory (models, custom_nodes, input, output); null = its own.
#       base_directory: null
##      One ComfyUI per GPU index listed (CUDA_VISIBLE_DEVICES, consecutive ports); [] = one.
#       gpus: []
#   nerfstudio:
##    Offer Nerfstudio tasks (ns-train, ns-export).
#     enabled: false
##    Directory holding the ns-* commands; null = look them up on PATH.
#     bin_dir: null
##    Keep the training checkpoint after a task (else only the exported outputs).
#     keep_checkpoint: false
##    TORCH_HOME for the ns-* commands (pre-seeded weights); null = inherit the agent's.
#     torch_home: null
##    Run COLMAP's feature extraction and matching on the GPU (ns-process-data --gpu); needs
##    a CUDA build of COLMAP (Debian's colmap package is CPU-only): false = --no-gpu.
#     colmap_gpu: false
##  Extra runtimes as module:factory (Python plugins; factory(settings) -> Runtime).
#   extra: []

## GPUs, found through NVML (the NVIDIA driver's libnvidia-ml.so.1).
# gpu:
##  false: never open NVML and advertise no GPU (a CPU-only agent).
#   enabled: true
##  A GPU at or above this temperature (degrees C) gets no new work until it cools down.
#   max_temperature_c: 90.0
##  Only these GPUs (NVML index or UUID), e.g. [1] for one agent per GPU; [] = every GPU.
#   devices: []

## The team's models (pulled from the gateway's sync set into <cache_dir>/models).
# models:
##  The runtime's models folder; null = the launched ComfyUI's <base_directory>/models,
##  else <cache_dir>/comfyui-models (point an attached ComfyUI's extra_model_paths there).
#   dir: null
##  Most bytes of cached models (least recently used outside the set are evicted); null = no limit.
#   budget_bytes: null
##  Downloads at once (1-16).
#   parallel: 2

## The local endpoint: /healthz, /readyz (probes), /metrics (Prometheus), /status.
# observe:
##  HOST:PORT to listen on; "" turns it off. Beyond loopback it needs token_file.
#   listen: 127.0.0.1:9464
##  File with the bearer token /metrics and /status require (16+ characters).
#   token_file: null

## Directories (~ is expanded; relative paths are taken from the working directory).
## State: agent id, task journal.
# state_dir: {state_dir}
## Task working directories (default: <state_dir>/work).
# work_dir: {work_dir}
## Model and download cache.
# cache_dir: {cache_dir}

## Logging: level debug, info, warning or error; format auto (console on a terminal,
## JSON lines otherwise), json or console.
# log_level: info
# log_format: auto

## Timeouts, in seconds (each > 0).
# timeouts:
##  Opening the gateway connection.
#   connect_s: 10
##  WebSocket ping interval and the wait for its pong.
#   ping_interval_s: 20
#   ping_timeout_s: 20
##  Heartbeat interval until the gateway's welcome sets another.
#   heartbeat_s: 15
##  Wait for the gateway to acknowledge a message.
#   ack_s: 10
##  Re-send interval of an unacknowledged terminal message (task result).
#   retransmit_s: 5
##  On the first SIGTERM: time for running tasks to finish before they are cancelled.
#   drain_grace_s: 900
##  After a cancel: time for a task to stop after its interrupt, before SIGTERM.
#   cancel_grace_s: 15
##  After SIGTERM to a task's processes: time before SIGKILL.
#   kill_grace_s: 10
##  One output upload, and one input download.
#   upload_s: 3600
#   download_s: 3600
##  A runtime (ComfyUI) becoming ready after launch.
#   runtime_ready_s: 120

## Limits the agent enforces on itself.
# limits:
##  Largest WebSocket frame, in bytes (>= 65536).
#   max_frame_bytes: 1048576
##  Largest total of a task's inputs, and of its outputs, in bytes.
#   max_input_bytes: 524288000
#   max_output_bytes: 10737418240
##  Progress messages per second per task (> 0, <= 20).
#   progress_per_s: 4.0
##  Log lines per batch sent to the gateway, and log bytes kept per task.
#   log_lines_per_batch: 200
#   log_bytes_per_task: 5242880
##  Free disk space (bytes) below which no new task is accepted.
#   min_free_disk_bytes: 1073741824
"""
