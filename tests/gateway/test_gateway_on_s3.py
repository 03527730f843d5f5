"""The gateway with a real S3-compatible server (SeaweedFS) behind its presigned URLs."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from agent.protocol.messages import OutputFile, TaskRef, UploadFile
from tests.gateway_process import FAST_TIMEOUTS, comfy_workflow, gateway
from tests.seaweedfs import SeaweedFS
from tests.simagent import SimAgent

IMAGE_PARAM = [
    {"key": "image", "type": "file", "accept": "image/*", "node_id": "10", "field": "image"}
]


@pytest.mark.asyncio
async def test_inputs_and_outputs_travel_through_s3(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    """Presigned input PUT, agent download, output upload and result download all hit real S3."""
    env = {
        "CYBERUN_GATEWAY_S3_ACCESS_KEY": seaweedfs.access_key,
        "CYBERUN_GATEWAY_S3_SECRET_KEY": seaweedfs.secret_key,
    }
    s3 = ("--s3-endpoint", seaweedfs.endpoint_url, "--s3-bucket", "gateway-test")
    with gateway(tmp_path / "gw", *s3, *FAST_TIMEOUTS, env=env) as gw:
        dk = gw.credential("s3-team")
        workflow = gw.create_workflow(dk, comfy_workflow(IMAGE_PARAM))
        with gw.client(dk) as http:
            slot = http.post(
                "/r/files/presign",
                json={"file_name": "in.png", "file_size": 5, "content_type": "image/png"},
            ).json()
            assert slot["upload_url"].startswith(seaweedfs.endpoint_url)
            assert (
                httpx.put(slot["upload_url"], content=b"12345").status_code == 403
            )  # headers missing
            ok = httpx.put(slot["upload_url"], content=b"12345", headers=slot["upload_headers"])
            assert ok.status_code == 200
            again = httpx.put(slot["upload_url"], content=b"54321", headers=slot["upload_headers"])
            assert again.status_code == 412  # If-None-Match: * — inputs are write-once
            run = http.post(
                f"/r/workflows/{workflow}/run", json={"parameters": {"image": slot["file_key"]}}
            )
            task_id = run.json()["task_id"]
            async with SimAgent(gw.ws_url, dk, "s3-agent") as agent:
                assign = await agent.next_assign()
                assert httpx.get(assign.inputs[0].download_url).content == b"12345"
                ref = TaskRef(task_id=assign.task_id, attempt=assign.attempt)
                data = b"result-bytes"
                upload = UploadFile(
                    name="r.png", size=len(data), content_type="image/png", sha256="1" * 64
                )
                target = (await agent.upload_urls(ref, [upload])).files[0]
                put = httpx.put(
                    target.upload_url or "", content=data, headers=target.upload_headers
                )
                assert put.status_code == 200
                output = OutputFile(
                    key="9.images.0",
                    storage_key=target.storage_key,
                    size=len(data),
                    sha256="1" * 64,
                    content_type="image/png",
                )
                await agent.complete(ref, [output])
                await agent.wait_acknowledged()
            result = http.get(f"/r/tasks/{task_id}/result").json()
            assert result["task_status"] == "completed"
            assert httpx.get(result["download_urls"]["9.images.0"]).content == data


@pytest.mark.asyncio
async def test_completion_with_a_missing_output_fails_the_task(
    tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    """An agent claiming an output that is not in storage gets its task failed, not completed."""
    env = {
        "CYBERUN_GATEWAY_S3_ACCESS_KEY": seaweedfs.access_key,
        "CYBERUN_GATEWAY_S3_SECRET_KEY": seaweedfs.secret_key,
    }
    s3 = ("--s3-endpoint", seaweedfs.endpoint_url, "--s3-bucket", "gateway-test")
    with gateway(tmp_path / "gw", *s3, *FAST_TIMEOUTS, env=env) as gw:
        dk = gw.credential("s3-liar")
        workflow = gw.create_workflow(dk, comfy_workflow())
        with gw.client(dk) as http:
            task_id = http.post(f"/r/workflows/{workflow}/run").json()["task_id"]
            async with SimAgent(gw.ws_url, dk, "liar") as agent:
                assign = await agent.next_assign()
                ref = TaskRef(task_id=assign.task_id, attempt=assign.attempt)
                ghost = OutputFile(
                    key="9.images.0",
                    storage_key=f"tasks/{task_id}/never.png",
                    size=10,
                    sha256="2" * 64,
                    content_type="image/png",
                )
                await agent.complete(ref, [ghost])
                await agent.wait_acknowledged()
            record = http.get(f"/r/tasks/{task_id}").json()
    assert record["task_status"] == "failed"
    assert "missing" in record["task_error"]
