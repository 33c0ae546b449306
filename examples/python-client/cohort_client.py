#!/usr/bin/env python3
"""Submits a job to a Cohort controller over its gRPC API, follows the job's
events until it ends, then prints its training metrics and its final state.

An example of calling the API from another language: the stubs are generated
from the repository's .proto files with grpcio-tools when the script starts
(into gen/, next to this file), so they always match the protos.

    examples/python-client/setup.sh        # a venv with grpcio and grpcio-tools
    examples/python-client/.venv/bin/python examples/python-client/cohort_client.py \\
        --controller ctl.example.org:7070 --ca-cert ca.crt --token-file submit.token \\
        examples/jobs/hello.yaml

Exit status: 0 when the job succeeded, 1 when it failed or was cancelled,
2 when it could not be submitted or followed (bad flags, unreadable job file,
unreachable controller, refused token, invalid job).
"""

import argparse
import datetime
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


class ClientError(Exception):
    """A problem the user can fix; printed without a traceback, exit status 2."""


# --- stubs ---------------------------------------------------------------------


def load_stubs(proto_dir):
    """Generates the Python modules of every .proto under `proto_dir` (once per
    content: gen/<digest>/) and imports cohort.v1's job service."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise ClientError(
            "grpcio-tools is not installed in this interpreter: run examples/python-client/setup.sh "
            "and use examples/python-client/.venv/bin/python"
        ) from None
    files = sorted(proto_dir.rglob("*.proto"))
    if not files:
        raise ClientError(f"no .proto files under {proto_dir} (--proto-dir)")
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(proto_dir)).encode() + b"\0" + f.read_bytes() + b"\0")
    gen_root = HERE / "gen"
    out = gen_root / digest.hexdigest()[:16]
    if not (out / ".complete").exists():
        gen_root.mkdir(exist_ok=True)
        # Generate into a private directory and rename it into place, so that
        # clients starting together never import half-written modules.
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=gen_root))
        well_known = Path(protoc.__file__).parent / "_proto"
        rc = protoc.main(
            ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}",
             f"--python_out={tmp}", f"--grpc_python_out={tmp}", *map(str, files)]
        )
        if rc != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ClientError(f"grpc_tools.protoc failed on {proto_dir} (exit {rc}); see its message above")
        (tmp / ".complete").touch()
        try:
            os.rename(tmp, out)
        except OSError:
            # Another client generated the same protos first.
            shutil.rmtree(tmp, ignore_errors=True)
    sys.path.insert(0, str(out))
    from cohort.v1 import common_pb2, job_pb2, job_pb2_grpc

    return common_pb2, job_pb2, job_pb2_grpc


# --- connection ----------------------------------------------------------------


def parse_controllers(spec, insecure):
    """`host:port`, `https://host:port` or `http://host:port` (with --insecure),
    comma-separated for several controllers (any of them answers)."""
    targets = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.startswith("http://"):
            if not insecure:
                raise ClientError(f"{item} is plaintext: pass --insecure for a controller started with --insecure")
            item = item[len("http://"):]
        elif item.startswith("https://"):
            if insecure:
                raise ClientError(f"{item} is TLS but --insecure was given: drop one of them")
            item = item[len("https://"):]
        item = item.rstrip("/")
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ClientError(f"bad controller address {item!r}: expected HOST:PORT, e.g. 127.0.0.1:7070")
        targets.append(item)
    if not targets:
        raise ClientError("no controller address: pass --controller HOST:PORT (or set COHORT_CONTROLLER)")
    return targets


def read_token(args):
    if args.token:
        return args.token.strip()
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as e:
            raise ClientError(f"cannot read token file {args.token_file}: {e.strerror}") from None
    return None


def open_channel(grpc, target, args):
    if args.insecure:
        return grpc.insecure_channel(target)
    if not args.ca_cert:
        raise ClientError(
            "TLS needs the cluster CA: pass --ca-cert ca.crt (from the controller's TLS directory), "
            "or --insecure for a controller started with --insecure"
        )
    try:
        ca = Path(args.ca_cert).read_bytes()
    except OSError as e:
        raise ClientError(f"cannot read CA certificate {args.ca_cert}: {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in ca:
        raise ClientError(f"{args.ca_cert} holds no PEM certificate: pass the cluster CA (ca.crt)")
    options = []
    if args.server_name:
        # The name the controller's certificate must hold, when it differs from the dialled host.
        options.append(("grpc.ssl_target_name_override", args.server_name))
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca), options=options)


def explain(grpc, error, target, what):
    """A ClientError naming what failed and how to fix it, for an RPC error."""
    code, details = error.code(), error.details() or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        hint = "is the controller running there, and is the address right?"
        if "ssl" in details.lower() or "handshake" in details.lower() or "certificate" in details.lower():
            hint = "the TLS handshake failed: is --ca-cert the cluster's CA, and does --server-name match its certificate?"
        return ClientError(f"cannot reach the controller at {target} ({what}): {details}; {hint}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ClientError(
            f"the controller at {target} refused the token ({what}): {details}; "
            "pass a valid --token or --token-file (cohort token create --role submit)"
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return ClientError(f"the controller at {target} refused {what}: {details}")
    return ClientError(f"{what} failed: {code.name}: {details}")


# --- printing ------------------------------------------------------------------


def enum_name(enum, value, prefix):
    """JOB_STATE_SUCCEEDED -> Succeeded (as `cohort status` shows it)."""
    try:
        name = enum.Name(value)
    except ValueError:
        return f"unknown({value})"
    return name[len(prefix):].replace("_", " ").capitalize()


def clock(unix_ms):
    if not unix_ms:
        return "-"
    t = datetime.datetime.fromtimestamp(unix_ms / 1000, tz=datetime.timezone.utc)
    return t.strftime("%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def metric_line(job_id, point):
    fields = [f"iteration={point.iteration}"]
    if point.HasField("total_iterations"):
        fields.append(f"total={point.total_iterations}")
    for name in ("loss", "learning_rate", "grad_norm", "iteration_time_s", "throughput_tflops",
                 "memory_gib", "elapsed_s", "remaining_s", "consumed_samples"):
        if point.HasField(name):
            fields.append(f"{name}={getattr(point, name)!r}")
    if point.is_eval:
        fields.append("eval=true")
    fields.append(f"format={point.format or '-'}")
    fields.append(f"node={point.node_name or '-'}")
    return f"metric {job_id} " + " ".join(fields)


# --- the flow ------------------------------------------------------------------


def submit(grpc, job_pb2, stub, target, args, token):
    path = Path(args.job_file)
    try:
        text = path.read_text()
    except OSError as e:
        raise ClientError(f"cannot read job file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ClientError(f"job file {path} is not UTF-8 text") from None
    if not text.strip():
        raise ClientError(f"job file {path} is empty")
    # The YAML text goes as written (JSON is YAML too); the controller validates
    # it and resolves a relative `workdir` against the file's own directory.
    file = job_pb2.JobFile(yaml=text, source_name=str(path), base_dir=str(path.resolve().parent))
    try:
        response = stub.SubmitJob(job_pb2.SubmitJobRequest(file=file), metadata=auth(token), timeout=args.timeout)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise ClientError(f"job file {path} was refused:\n{e.details()}") from None
        raise explain(grpc, e, target, "SubmitJob") from None
    for warning in response.warnings:
        print(f"warning: {warning}", flush=True)
    return response.job


def auth(token):
    return [("authorization", f"Bearer {token}")] if token else []


def finished(job_pb2, job):
    done = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED)
    return job.state in done and job.live_processes == 0


def follow(grpc, job_pb2, stub, target, job_id, token):
    """Prints every event of the job and every stage transition of a pipeline
    until the job has ended and its processes are gone; returns the last Job."""
    stages = {}
    last_state = None
    for _ in range(10):
        try:
            for event in stub.WatchJob(job_pb2.WatchJobRequest(job=job_id), metadata=auth(token)):
                job = event.job
                state = enum_name(job_pb2.JobState, job.state, "JOB_STATE_")
                if state != last_state or event.message:
                    print(f"event {clock(event.unix_ms)} job {job.id} {state}: {event.message}", flush=True)
                last_state = state
                for stage in job.stages:
                    now = enum_name(job_pb2.StageState, stage.state, "STAGE_STATE_")
                    before = stages.get(stage.name)
                    if now != before:
                        why = f" ({stage.reason})" if stage.reason else ""
                        print(f"stage {stage.name}: {before or 'none'} -> {now}{why}", flush=True)
                        stages[stage.name] = now
                if finished(job_pb2, job):
                    return job
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise explain(grpc, e, target, "WatchJob") from None
            print(f"event stream broke ({e.details()}); watching again", file=sys.stderr, flush=True)
        # The stream ended before the job did (a controller restart or failover).
        try:
            job = stub.GetJob(job_pb2.GetJobRequest(job=job_id), metadata=auth(token), timeout=30)
        except grpc.RpcError as e:
            raise explain(grpc, e, target, "GetJob") from None
        if finished(job_pb2, job):
            return job
    raise ClientError(f"lost the event stream of job {job_id} ten times; follow it with `cohort status {job_id}`")


def print_metrics(grpc, job_pb2, stub, target, job, token):
    """The training metrics of the job and, for a pipeline, of every stage run."""
    ids = [job.id] + [run for stage in job.stages for run in stage.runs]
    for job_id in ids:
        try:
            points = list(stub.GetMetrics(job_pb2.GetMetricsRequest(job=job_id), metadata=auth(token), timeout=60))
        except grpc.RpcError as e:
            raise explain(grpc, e, target, f"GetMetrics of {job_id}") from None
        if job_id != job.id or points:
            print(f"metrics {job_id}: {len(points)} points", flush=True)
        for point in points:
            print(metric_line(job_id, point), flush=True)


def print_final(job_pb2, job):
    state = enum_name(job_pb2.JobState, job.state, "JOB_STATE_")
    print(f"final: job {job.id} {state}" + (f": {job.reason}" if job.reason else ""), flush=True)
    if job.state == job_pb2.JOB_STATE_SUCCEEDED:
        return 0
    failed = [s.name for s in job.stages if s.state == job_pb2.STAGE_STATE_FAILED]
    detail = f"job {job.id} {state.lower()}"
    if failed:
        detail += f" (failed stage: {', '.join(failed)})"
    f = job.failure
    if job.HasField("failure") and f.node_name:
        code = f", exit code {f.exit_code}" if f.HasField("exit_code") else ""
        detail += f": {f.cause or 'failure'} on node {f.node_name} (node rank {f.node_rank}{code}): {f.message}"
    elif job.reason:
        detail += f": {job.reason}"
    print(f"error: {detail}", file=sys.stderr, flush=True)
    return 1


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Submit a Cohort job, follow its events, print its metrics and final state."
    )
    parser.add_argument("job_file", help="the job file (YAML or JSON), e.g. a kind: pipeline job")
    parser.add_argument("--controller", default=os.environ.get("COHORT_CONTROLLER", "127.0.0.1:7070"),
                        help="HOST:PORT or URL of a controller, comma-separated for several "
                             "(env COHORT_CONTROLLER; default 127.0.0.1:7070)")
    parser.add_argument("--ca-cert", default=os.environ.get("COHORT_CA_CERT"),
                        help="the cluster CA (ca.crt from the controller's TLS directory; env COHORT_CA_CERT)")
    parser.add_argument("--server-name", default=os.environ.get("COHORT_SERVER_NAME"),
                        help="the name the controller's certificate must hold, when not the dialled host")
    parser.add_argument("--token", default=os.environ.get("COHORT_TOKEN"),
                        help="bearer token of role submit or admin (env COHORT_TOKEN)")
    parser.add_argument("--token-file", default=os.environ.get("COHORT_TOKEN_FILE"),
                        help="a file holding the token (env COHORT_TOKEN_FILE)")
    parser.add_argument("--insecure", action="store_true", default=bool(os.environ.get("COHORT_INSECURE")),
                        help="plaintext, for a controller started with --insecure")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds a unary call may take, connecting included (default 30)")
    parser.add_argument("--proto-dir", type=Path, default=REPO / "proto" / "proto",
                        help="where the cohort/v1/*.proto files are (default: this repository's)")
    args = parser.parse_args(argv)
    try:
        targets = parse_controllers(args.controller, args.insecure)
        token = read_token(args)
        _, job_pb2, job_pb2_grpc = load_stubs(args.proto_dir)
        import grpc

        # Any controller answers (standbys forward to the leader): take the first that does.
        errors = []
        for target in targets:
            channel = open_channel(grpc, target, args)
            stub = job_pb2_grpc.JobServiceStub(channel)
            try:
                job = submit(grpc, job_pb2, stub, target, args, token)
                break
            except ClientError as e:
                if len(targets) == 1 or not str(e).startswith("cannot reach"):
                    raise
                errors.append(str(e))
                channel.close()
        else:
            raise ClientError("no controller reachable:\n  " + "\n  ".join(errors))
        print(f"submitted job {job.id} ({job.kind}) to {target}", flush=True)
        job = follow(grpc, job_pb2, stub, target, job.id, token)
        print_metrics(grpc, job_pb2, stub, target, job, token)
        return print_final(job_pb2, job)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
