"""distributed.py: who owns the default process group (cptrain destroys the one it created and
leaves open the one a calling program set up: tests/e2e/dist_jobs.py trains several runs in one
group), the launch checks, and the rank-aware helpers without a group. Training under torchrun
is tested end to end in tests/e2e/test_distributed.py."""

import socket

import pytest
import torch
import torch.distributed as dist

from cptrain.config import DistributedConfig
from cptrain.distributed import (
    DistEnv,
    init_distributed,
    launched_by_torchrun,
    set_grad_sync,
    shutdown,
    wrap_model,
)
from cptrain.errors import ConfigError


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



@pytest.fixture
def no_launcher(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


def test_without_a_group_the_helpers_are_the_identity_on_one_process(no_launcher):
    env = init_distributed(DistributedConfig(strategy="none"))
    assert not env.active and env.is_main and not env.owns_group
    assert (env.rank, env.world_size) == (0, 1) and not dist.is_initialized()
    assert env.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    env.barrier()
    assert env.all_gather_object({"a": 1}) == [{"a": 1}]
    assert env.broadcast_object([3]) == [3] and env.sum_scalar(2.5) == 2.5
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, env, DistributedConfig(strategy="none")) is model
    with set_grad_sync(model, env, enabled=False):
        pass
    shutdown(env)
    assert not DistEnv("none", rank=1).is_main


def test_launch_mistakes_are_one_line_config_errors(no_launcher, monkeypatch):
    assert not launched_by_torchrun()
    with pytest.raises(ConfigError, match="needs torchrun") as err:
        init_distributed(DistributedConfig(strategy="ddp"))
    assert "\n" not in str(err.value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launched with 2 processes but distributed.strategy"):
        init_distributed(DistributedConfig(strategy="none"))
    monkeypatch.setenv("RANK", "0")
    assert launched_by_torchrun()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="backend=nccl needs GPUs"):
            init_distributed(DistributedConfig(strategy="ddp", backend="nccl"))
    assert not dist.is_initialized()
