"""Cluster awareness (SPEC §6): refuse, before any work starts, storage or tracking that the other
nodes of a multi-node Ray cluster cannot reach.

On one machine every path is shared. On a cluster, Ray Train workers and Tune trials run on other
nodes: they write checkpoints under `storage_path` and log to the MLflow tracking URI from there.
A path local to the driver's node, a `sqlite:///` file on its disk, or `http://127.0.0.1:5000`
would split one run over several disks and databases, or fail late inside the worker group with
Ray's storage-validation error. These checks turn that into one clear `ConfigError` up front.

*Multi-node* means more than one alive node (`ray.nodes()`), or a single alive node that cannot
hold even one training worker (e.g. a CPU head with `CPU: 0` and GPU workers at `min_workers: 0`):
then the work can only run on nodes the autoscaler adds later.

*Shared* storage is a URI with a remote scheme (`s3://`, `gs://`, `abfs://`, `hdfs://`, ...) or a
local path the user declares shared, because it lies on a mount every node has at the same place
(NFS, EFS): `shared=True` (the `--shared-storage` flag) declares the storage path (and what lies
under it); `LARP_SHARED_STORAGE=/mnt/larp:/data` declares the paths under those mount roots;
`LARP_SHARED_STORAGE=1` declares every local path. Declared paths are trusted, not probed.

Tracking: an `http(s)://` MLflow server reachable by every node (the one `cluster.yaml` starts on
the head) is the recommended store. A `sqlite:///` or `file://` store is refused on a multi-node
cluster unless it lies on declared shared storage, and SQLite there is still warned about (network
file systems lock poorly with concurrent writers). A loopback host (`127.0.0.1`, `localhost`) is
refused when the alive nodes sit on more than one host.

The frozen-feature cache needs nothing: its key is content-based, so the default per-node
directory (`~/.cache/larp/features`) and a shared one both work.

Ray is imported lazily (only by `cluster_nodes`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from larp.errors import ConfigError

SHARED_ENV = "LARP_SHARED_STORAGE"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
_LOOPBACK = {"localhost", "0.0.0.0", "::1"}
HEAD_SERVER_HINT = "http://<head private IP>:5000 (the MLflow server cluster.yaml starts)"


class ClusterWarning(UserWarning):
    """A cluster set-up that works but is fragile (e.g. SQLite on NFS)."""


@dataclass(frozen=True)
class SharedDeclaration:
    """Which local paths the user declared to be on storage every node mounts alike."""

    everything: bool = False
    roots: tuple[Path, ...] = ()

    def covers(self, path: Path) -> bool:
        return self.everything or any(path.is_relative_to(root) for root in self.roots)

    def describe(self) -> str:
        if self.everything:
            return "every local path"
        if self.roots:
            return "paths under " + ", ".join(map(str, self.roots))
        return "nothing"


def declared_shared(
    env: Mapping[str, str] | None = None, extra_roots: Sequence[Path] = ()
) -> SharedDeclaration:
    """The declaration of `LARP_SHARED_STORAGE`, plus `extra_roots` (the storage path itself
    when `--shared-storage` is given)."""
    env = os.environ if env is None else env
    raw = env.get(SHARED_ENV, "").strip()
    extra = tuple(Path(r).expanduser().resolve() for r in extra_roots)
    if raw.lower() in _TRUE:
        return SharedDeclaration(everything=True)
    if raw.lower() in _FALSE:
        return SharedDeclaration(roots=extra)
    roots = [part.strip() for part in raw.split(os.pathsep) if part.strip()]
    relative = [r for r in roots if not Path(r).expanduser().is_absolute()]
    if relative:
        raise ConfigError(
            f"{SHARED_ENV} must be 1, 0, or absolute mount roots separated by '{os.pathsep}' "
            f"(e.g. /mnt/larp); got relative {relative}"
        )
    return SharedDeclaration(roots=tuple(Path(r).expanduser().resolve() for r in roots) + extra)


# ---------------------------------------------------------------------- classifying locations
def local_storage_path(storage: str) -> Path | None:
    """The local path of a storage location; None for a remote URI (s3://, gs://, ...)."""
    if "://" in storage:
        scheme, rest = storage.split("://", 1)
        if scheme.lower() != "file":
            return None
        storage = rest
    return Path(storage).expanduser().resolve()


def tracking_store_path(uri: str) -> tuple[str, Path] | None:
    """("SQLite database" | "file store", path) for a store on the local disk; None for a
    served store (http(s)://, databricks, a database server, ...)."""
    lowered = uri.lower()
    if lowered.startswith("sqlite:///"):
        rest = uri[len("sqlite:///") :]
        if rest in ("", ":memory:"):
            return None
        return "SQLite database", Path(rest).expanduser().resolve()
    if lowered.startswith("file://"):
        return "file store", Path(uri[len("file://") :]).expanduser().resolve()
    if "://" not in uri and not lowered.startswith("databricks"):
        return "file store", Path(uri).expanduser().resolve()
    return None


def is_loopback(host: str | None) -> bool:
    return bool(host) and (host.lower() in _LOOPBACK or host.startswith("127."))


# ---------------------------------------------------------------------- the nodes
def cluster_nodes() -> list[dict[str, Any]]:
    """`ray.nodes()` of the cluster this driver is connected to."""
    import ray

    return ray.nodes()


def alive_nodes(nodes: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [node for node in nodes if node.get("Alive", node.get("alive", False))]


def _fits(node: Mapping[str, Any], needs: Mapping[str, float]) -> bool:
    resources = node.get("Resources") or {}
    return all(float(resources.get(k, 0.0)) >= float(v) for k, v in needs.items() if v > 0)


def spans_nodes(
    nodes: Sequence[Mapping[str, Any]], needs: Mapping[str, float] | None = None
) -> str | None:
    """Why the work will run on more than one node (a phrase), or None when it stays on one."""
    alive = alive_nodes(nodes)
    if len(alive) > 1:
        return f"this Ray cluster has {len(alive)} alive nodes"
    if needs and alive and not any(_fits(node, needs) for node in alive):
        wanted = ", ".join(f"{k}={v:g}" for k, v in needs.items() if v > 0)
        return (
            f"no alive node can hold one worker ({wanted}), so the work will run on nodes "
            "that join later (the autoscaler's workers)"
        )
    return None


def worker_needs(train_config) -> dict[str, float]:
    """Resources one Ray Train worker of `train_config` asks for."""
    needs = {"CPU": float(train_config.cpus_per_worker)}
    if train_config.use_gpu:
        needs["GPU"] = float(train_config.gpus_per_worker)
    return needs


# ---------------------------------------------------------------------- the checks
def cluster_problems(
    storage_path: str,
    tracking_uri: str | None = None,
    *,
    nodes: Sequence[Mapping[str, Any]],
    shared: bool = False,
    needs: Mapping[str, float] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """(errors, warnings) for running with this storage and tracking on `nodes` (pure)."""
    why = spans_nodes(nodes, needs)
    if why is None:
        return [], []
    local = local_storage_path(storage_path)
    declared = declared_shared(env, [local] if shared and local is not None else [])
    errors: list[str] = []
    notes: list[str] = []
    if local is not None and not declared.covers(local):
        errors.append(
            f"storage_path {local} is a local path, but {why}: Ray Train workers and Tune trials "
            "on the other nodes would write checkpoints to their own disks, where the driver and "
            "the other trials cannot read them. Use storage every node shares: an "
            "s3://BUCKET/prefix (or gs://...) URI, or a path on a mount every node has at the "
            "same place (NFS/EFS, e.g. /mnt/larp/larp_runs) declared with --shared-storage or "
            f"{SHARED_ENV}=/mnt/larp (declared now: {declared.describe()})."
        )
    if tracking_uri:
        store = tracking_store_path(tracking_uri)
        if store is not None:
            kind, path = store
            if not declared.covers(path):
                errors.append(
                    f"tracking URI {tracking_uri} is a {kind} on this node's disk ({path}), but "
                    f"{why}: trials and workers on the other nodes would log to {kind}s of their "
                    f"own. Use the MLflow server on the head node: --tracking-uri "
                    f"{HEAD_SERVER_HINT}; or put the store on a declared shared mount."
                )
            elif kind == "SQLite database":
                notes.append(
                    f"tracking URI {tracking_uri}: SQLite on a shared network file system is "
                    "unreliable with writers on several nodes (file locking); prefer the MLflow "
                    f"server on the head node ({HEAD_SERVER_HINT})."
                )
        else:
            host = urlsplit(tracking_uri).hostname
            hosts = {n.get("NodeManagerAddress") for n in alive_nodes(nodes)}
            if is_loopback(host) and len(hosts) > 1:
                errors.append(
                    f"tracking URI {tracking_uri} names the loopback host {host}, but the "
                    f"cluster's nodes are on {len(hosts)} hosts: each node would look for MLflow "
                    f"on itself. Use the head node's private address: {HEAD_SERVER_HINT}."
                )
    return errors, notes


def check_cluster(
    storage_path: str,
    tracking_uri: str | None = None,
    *,
    shared: bool = False,
    needs: Mapping[str, float] | None = None,
    nodes: Sequence[Mapping[str, Any]] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Raise `ConfigError` if the run's storage or tracking cannot work across the cluster's
    nodes (`nodes` defaults to `ray.nodes()`: call after connecting); warn (`ClusterWarning`)
    about fragile set-ups and return those warnings."""
    if nodes is None:
        nodes = cluster_nodes()
    errors, notes = cluster_problems(
        storage_path, tracking_uri, nodes=nodes, shared=shared, needs=needs, env=env
    )
    for note in notes:
        warnings.warn(note, ClusterWarning, stacklevel=2)
    if errors:
        raise ConfigError(" ".join(errors))
    return notes
