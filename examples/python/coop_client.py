#!/usr/bin/env python3
"""A member's own client of a coop cluster, in Python, over the gRPC API.

Submits a job, follows it until it ends, and prints the job and the member's
usage as JSON. Stubs are generated from the repository's protos (the script
makes the directory, then runs grpc_tools.protoc); from the repository root:

    python3 -m pip install grpcio grpcio-tools
    examples/python/make-stubs stubs
    PYTHONPATH=stubs COOP_ADDR=127.0.0.1:7070 COOP_TOKEN=coop_... COOP_CA=.../ca.pem \
        python3 examples/python/coop_client.py -- sh -c 'echo hello'

The scheduler is verified against the cluster CA in COOP_CA (`coop dev` prints
it); without COOP_CA the channel is plain text, for a scheduler run --insecure.
"""

import json
import os
import sys

import grpc

from coop.v1 import coop_pb2 as pb
from coop.v1 import coop_pb2_grpc as rpc

FINAL = {
    pb.JOB_STATE_COMPLETED: "completed",
    pb.JOB_STATE_FAILED: "failed",
    pb.JOB_STATE_CANCELLED: "cancelled",
    pb.JOB_STATE_LOST: "lost",
}


def main() -> int:
    addr = os.environ.get("COOP_ADDR", "127.0.0.1:7070").split(",")[0]
    addr = addr.removeprefix("http://").removeprefix("https://")
    ca = os.environ.get("COOP_CA")
    token = os.environ.get("COOP_TOKEN")
    if not token:
        print("error: token: set COOP_TOKEN to your member token", file=sys.stderr)
        return 2
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    command = args or ["sh", "-c", "echo hello from python"]
    auth = [("authorization", f"Bearer {token}")]

    if ca:
        with open(ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(addr, creds)
    else:
        channel = grpc.insecure_channel(addr)
    with channel:
        jobs = rpc.JobServiceStub(channel)
        usage = rpc.UsageServiceStub(channel)
        try:
            job = jobs.Submit(
                pb.SubmitJobRequest(kind=pb.JOB_KIND_FINETUNE, gpus=1, command=command),
                metadata=auth,
            ).job
            print(f"submitted {job.id}", file=sys.stderr)
            # The stream sends the job as it is, then every change, and ends
            # after a final state.
            for event in jobs.Watch(pb.WatchJobRequest(id=job.id), metadata=auth):
                job = event.job
                print(f"{job.id} {pb.JobState.Name(job.state)}", file=sys.stderr)
            mine = usage.Get(pb.GetUsageRequest(), metadata=auth).members[0]
        except grpc.RpcError as e:
            print(f"error: {e.details()} ({e.code().name})", file=sys.stderr)
            return 1

    print(json.dumps({
        "id": job.id,
        "member": job.member,
        "state": FINAL.get(job.state, pb.JobState.Name(job.state)),
        "exit_code": job.exit_code if job.HasField("exit_code") else None,
        "gpus": list(job.gpus),
        "gpu_seconds": job.gpu_ms / 1000,
        "usage": {
            "member": mine.member,
            "gpu_seconds": mine.gpu_ms / 1000,
            "energy_j": mine.energy_mj / 1000,
            "finished_jobs": mine.finished_jobs,
            "entitlement": mine.entitlement,
            "factor": mine.factor,
        },
    }))
    return 0 if job.state == pb.JOB_STATE_COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
