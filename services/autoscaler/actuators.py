"""Actuators: turn "shard S wants N replicas" into replicas.

    KubernetesActuator  GET/PATCH the apps/v1 Deployment `scale` subresource (stdlib only)
    LocalActuator       start/stop `python -m services.expert` processes on this machine

Both implement `current(spec, live) -> int | None` (None: unknown this interval, already logged)
and `scale(spec, replicas) -> bool`, and never raise out of either: an error is logged once per
shard and kind, counted in moe_autoscaler_actuation_errors_total, and retried next interval.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from prometheus_client import Counter

from services.autoscaler.policy import ShardSpec
from services.common.expert_ids import format_id_list
from services.common.logging import event, get_logger
from services.common.redis_store import ReplicaRecord
from services.common.supervisor import (
    DEFAULT_GRACE_S,
    EXPERT_PROGRAM,
    Child,
    expert_replica_command,
    reap,
    start_child,
    wait_or_kill,
)

log = get_logger("autoscaler")

ACTUATION_ERRORS = Counter("moe_autoscaler_actuation_errors_total",
                           "Failed actuator calls (reading or changing replicas)", ["shard", "kind"])

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"


class _ErrorLog:
    """Log each (shard, kind) error once until that shard succeeds again."""

    def __init__(self) -> None:
        self._seen: dict[str, set[str]] = {}

    def failed(self, shard: str, kind: str, message: str, **fields: object) -> None:
        ACTUATION_ERRORS.labels(shard=shard, kind=kind).inc()
        seen = self._seen.setdefault(shard, set())
        if kind not in seen:
            seen.add(kind)
            event(log, message, level=logging.WARNING, shard=shard, error_kind=kind,
                  retry="next interval", **fields)

    def ok(self, shard: str) -> None:
        if self._seen.pop(shard, None):
            event(log, "actuator recovered", shard=shard)


# ---- Kubernetes --------------------------------------------------------------------------

class KubernetesActuator:
    """Reads and patches `/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`.

    Needs only get and patch on deployments/scale in its namespace. The service-account token is
    re-read on every request (the kubelet rotates bound tokens in place)."""

    def __init__(self, api_url: str, namespace: str, *, token_path: str | Path | None = None,
                 ca_path: str | Path | None = None, timeout_s: float = 5.0) -> None:
        if not namespace:
            raise ValueError("Kubernetes namespace is empty (set --namespace / MOE_NAMESPACE)")
        self.api_url = api_url.rstrip("/")
        self.namespace = namespace
        self.token_path = Path(token_path) if token_path else None
        self.timeout_s = timeout_s
        self.context: ssl.SSLContext | None = None
        if self.api_url.startswith("https://"):
            self.context = ssl.create_default_context(cafile=str(ca_path) if ca_path else None)
        self.errors = _ErrorLog()

    @classmethod
    def from_environment(cls, namespace: str | None = None, api_url: str | None = None) -> "KubernetesActuator":
        """In-cluster config: KUBERNETES_SERVICE_HOST/PORT, the service account's token and CA,
        namespace from the argument or the service account. `api_url` (e.g. http://127.0.0.1:8001
        behind `kubectl proxy`) replaces the in-cluster address; the token is still sent when the
        file exists."""
        token = SERVICE_ACCOUNT_DIR / "token"
        ca = SERVICE_ACCOUNT_DIR / "ca.crt"
        if not namespace:
            try:
                namespace = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
            except OSError:
                raise ValueError("no namespace: pass --namespace / MOE_NAMESPACE (not running in a pod?)") from None
        if not api_url:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise ValueError("KUBERNETES_SERVICE_HOST is unset: not running in a pod; "
                                 "pass --kube-api (e.g. http://127.0.0.1:8001 with kubectl proxy)")
            host = f"[{host}]" if ":" in host else host
            api_url = f"https://{host}:{port}"
        return cls(api_url, namespace, token_path=token if token.exists() else None,
                   ca_path=ca if ca.exists() else None)

    def scale_path(self, deployment: str) -> str:
        return f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{deployment}/scale"

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Accept": "application/json"}
        if self.token_path is not None:
            headers["Authorization"] = f"Bearer {self.token_path.read_text().strip()}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = MERGE_PATCH
        request = urllib.request.Request(self.api_url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context) as response:
            return json.loads(response.read() or b"{}")

    def _call(self, spec: ShardSpec, method: str, body: dict | None = None) -> dict | None:
        if not spec.deployment:
            self.errors.failed(spec.name, "no-deployment", "shard has no deployment in the targets config")
            return None
        path = self.scale_path(spec.deployment)
        try:
            result = self._request(method, path, body)
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode(errors="replace")
            hint = {401: "token rejected", 403: "the Role must allow get/patch on deployments/scale",
                    404: "no such Deployment in this namespace"}.get(err.code)
            self.errors.failed(spec.name, f"http-{err.code}", "kubernetes API refused", method=method,
                               path=path, status=err.code, hint=hint, detail=detail)
            return None
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            self.errors.failed(spec.name, "unreachable", "kubernetes API unreachable", method=method,
                               url=self.api_url, error=str(reason))
            return None
        self.errors.ok(spec.name)
        return result

    def current(self, spec: ShardSpec, live: Sequence[ReplicaRecord] = ()) -> int | None:
        """The Deployment's spec.replicas (what was asked, not what is ready)."""
        result = self._call(spec, "GET")
        if result is None:
            return None
        try:
            return int((result.get("spec") or {}).get("replicas", 0))
        except (TypeError, ValueError):
            self.errors.failed(spec.name, "bad-response", "scale subresource without spec.replicas",
                               body=json.dumps(result)[:300])
            return None

    def scale(self, spec: ShardSpec, replicas: int, live: Sequence[ReplicaRecord] = ()) -> bool:
        return self._call(spec, "PATCH", {"spec": {"replicas": int(replicas)}}) is not None

    def close(self) -> None:
        pass


# ---- local processes ------------------------------------------------------------------------

@dataclass
class LocalActuator:
    """Runs expert replicas as child processes of the autoscaler (clusters on one machine).

    Replica k of shard S runs `python -m services.expert --model M --cluster C --redis-url U
    --host 127.0.0.1 --port 0 --metrics-port 0 --experts E --shard S --replica-id <S>-as<pid>-<k>
    --plane 0 [extra_args]`, its log in `<run_dir>/<replica-id>.log`. Replicas of the shard that
    someone else started (the launcher) count towards `current` but are never stopped: only our
    own children are. Scale-down stops the newest child (SIGTERM, SIGKILL after `grace_s`)
    without blocking the loop; `close` stops every child and waits."""

    model: str
    redis_url: str
    cluster: str
    run_dir: Path
    host: str = "127.0.0.1"
    grace_s: float = DEFAULT_GRACE_S
    extra_args: Sequence[str] = ()
    command: Sequence[str] = EXPERT_PROGRAM   # tests run a stand-in
    children: dict[str, list[Child]] = field(default_factory=dict)
    errors: _ErrorLog = field(default_factory=_ErrorLog)
    _counter: int = 0

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def argv(self, spec: ShardSpec, replica_id: str) -> list[str]:
        return [*expert_replica_command(program=self.command, model=self.model, experts=format_id_list(spec.experts),
                                        shard=spec.name, replica_id=replica_id, cluster=self.cluster,
                                        redis_url=self.redis_url, host=self.host),
                *self.extra_args]

    def _reap(self, shard: str) -> list[Child]:
        """Drop exited children (logging unexpected exits), SIGKILL those past their grace."""

        def exited(child: Child, status: int) -> None:
            if not child.stopping:
                event(log, "replica exited on its own", level=logging.WARNING, shard=shard,
                      replica=child.name, pid=child.process.pid, status=status, log=str(child.log_path))

        def killed(child: Child) -> None:
            event(log, "replica ignored SIGTERM, killing", level=logging.WARNING, shard=shard,
                  replica=child.name, pid=child.process.pid)

        self.children[shard] = reap(self.children.get(shard, []), exited=exited, killed=killed)
        return self.children[shard]

    def running(self, shard: str) -> list[Child]:
        """Our children of `shard` that are running and not being stopped."""
        return [c for c in self._reap(shard) if not c.stopping]

    def current(self, spec: ShardSpec, live: Sequence[ReplicaRecord] = ()) -> int | None:
        ours = self.running(spec.name)
        ids = {c.name for c in self.children.get(spec.name, [])}
        foreign = [r for r in live if r.shard == spec.name and r.id not in ids]
        return len(ours) + len(foreign)

    def scale(self, spec: ShardSpec, replicas: int, live: Sequence[ReplicaRecord] = ()) -> bool:
        ours = self.running(spec.name)
        have = self.current(spec, live) or 0
        if replicas > have:
            for _ in range(replicas - have):
                if not self._start(spec):
                    return False
        elif replicas < have:
            surplus = min(have - replicas, len(ours))
            if surplus < have - replicas:
                event(log, "cannot stop replicas this autoscaler did not start", level=logging.WARNING,
                      shard=spec.name, wanted=replicas, foreign=have - len(ours))
            for child in sorted(ours, key=lambda c: c.process.pid, reverse=True)[:surplus]:
                self._terminate(spec.name, child)
        return True

    def _start(self, spec: ShardSpec) -> bool:
        self._counter += 1
        replica_id = f"{spec.name}-as{os.getpid()}-{self._counter}"
        log_path = self.run_dir / f"{replica_id}.log"
        argv = self.argv(spec, replica_id)
        try:
            process = start_child(argv, log_path)
        except OSError as err:
            self.errors.failed(spec.name, "spawn", "could not start replica", argv=" ".join(argv), error=str(err))
            return False
        self.errors.ok(spec.name)
        self.children.setdefault(spec.name, []).append(Child(replica_id, process, log_path))
        event(log, "replica started", shard=spec.name, replica=replica_id, pid=process.pid, log=str(log_path))
        return True

    def _terminate(self, shard: str, child: Child) -> None:
        child.terminate(self.grace_s)
        event(log, "replica stopping", shard=shard, replica=child.name, pid=child.process.pid)

    def close(self) -> None:
        """SIGTERM every child we started, SIGKILL whichever outlives the grace, wait for all."""
        everyone = [(shard, c) for shard, kids in self.children.items() for c in kids]
        for shard, child in everyone:
            if not child.stopping:
                self._terminate(shard, child)
        deadline = time.monotonic() + self.grace_s
        for _shard, child in everyone:
            wait_or_kill(child.process, deadline - time.monotonic())
        self.children.clear()
