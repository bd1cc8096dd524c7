"""DDP's rendezvous on a local Ray: loopback only, as every other listener of a local run.

torch's TCPStore (the store init_process_group opens on the rank-0 worker) listens on every
interface whatever host it is given; only a listening socket handed to it (master_listen_fd)
narrows that. Ray Train opens the store itself, so on a local Ray the TorchTrainer gets
`torch_config()`, whose backend hands Ray an address whose store already listens on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import socket

import ray.train.torch.config as ray_torch_config
from ray.train.torch import TorchConfig
from torch.distributed import TCPStore

from gendertune.cluster.runtime import is_local

# The rank-0 worker's loopback store; torch's multi-tenant TCPStore (what init_process_group
# creates) reuses a live server on the same port in the same process instead of binding its own.
_loopback_store: TCPStore | None = None


def _loopback_store_address() -> tuple[str, int]:
    """Runs on the rank-0 worker in place of Ray's get_address_and_port: a TCPStore server on a
    socket bound to 127.0.0.1 (torch binds the wildcard address unless handed a listening socket)."""
    global _loopback_store
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(socket.SOMAXCONN)
    port = listener.getsockname()[1]
    _loopback_store = TCPStore(
        "127.0.0.1", port, is_master=True, multi_tenant=True, master_listen_fd=listener.detach(), wait_for_workers=False
    )
    return "127.0.0.1", port


class _LoopbackTorchBackend(ray_torch_config._TorchBackend):
    """Ray Train's torch backend, with the rendezvous address (and store) from _loopback_store_address.
    Ray offers no hook for it, so its module's function is swapped for the process group set-up
    only (in the Train controller, which runs one trainer)."""

    def on_start(self, worker_group, backend_config) -> None:
        ray_address_and_port = ray_torch_config.get_address_and_port
        ray_torch_config.get_address_and_port = _loopback_store_address
        try:
            super().on_start(worker_group, backend_config)
        finally:
            ray_torch_config.get_address_and_port = ray_address_and_port


@dataclasses.dataclass
class _LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def torch_config() -> TorchConfig:
    """The TorchTrainer's process group set-up: loopback-only on a local Ray, Ray's own on a cluster."""
    return _LoopbackTorchConfig() if is_local() else TorchConfig()
