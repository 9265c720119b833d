"""Who owns the default process group: cptrain destroys the one it created and leaves open the
one a calling program set up (tests/dist_jobs.py trains several runs in one group)."""

import socket

import pytest
import torch.distributed as dist

from cptrain.config import DistributedConfig
from cptrain.distributed import init_distributed, shutdown


@pytest.fixture
def one_rank_env(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_group_cptrain_created_is_destroyed_at_the_end(one_rank_env):
    assert not dist.is_initialized()
    env = init_distributed(DistributedConfig(strategy="ddp", backend="gloo"))
    assert dist.is_initialized() and env.owns_group
    shutdown(env)
    assert not dist.is_initialized()


def test_a_group_the_caller_created_stays_open(one_rank_env):
    dist.init_process_group("gloo")
    env = init_distributed(DistributedConfig(strategy="ddp", backend="gloo"))
    assert not env.owns_group
    shutdown(env)
    assert dist.is_initialized()
    env = init_distributed(DistributedConfig(strategy="fsdp2", backend="gloo"))  # a second run
    shutdown(env)
    assert dist.is_initialized() and dist.get_world_size() == 1
