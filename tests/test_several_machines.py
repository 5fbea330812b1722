"""torchrun's options for one machine and for several (issue 18); the real two-machine run is in
test_distributed.py."""

import pytest

from image_classifier.distributed import launch_args
from image_classifier.errors import UserError

NODE = {"PET_NODE_RANK": "1", "PET_MASTER_ADDR": "node0.cluster", "PET_MASTER_PORT": "29400"}


def test_one_machine_is_standalone_whatever_the_environment() -> None:
    assert launch_args(4, 1, NODE) == ["--standalone", "--nproc-per-node=4"]


def test_several_machines_meet_at_node_zero_with_fixed_ranks() -> None:
    assert launch_args(4, 2, NODE) == [
        "--nnodes=2",
        "--nproc-per-node=4",
        "--rdzv-backend=static",
        "--node-rank=1",
        "--master-addr=node0.cluster",
        "--master-port=29400",
    ]
    assert launch_args(1, 2, {**NODE, "PET_MASTER_PORT": "", "PET_NNODES": "2"})[-1] == "--master-port=29500"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "train.nodes = 2 needs PET_NODE_RANK and PET_MASTER_ADDR in the environment"),
        ({"PET_NODE_RANK": "0"}, "train.nodes = 2 needs PET_MASTER_ADDR in the environment"),
        ({**NODE, "PET_NODE_RANK": "2"}, "PET_NODE_RANK = '2': this machine's number, 0 to 1"),
        ({**NODE, "PET_NODE_RANK": "first"}, "PET_NODE_RANK = 'first'"),
        ({**NODE, "PET_NNODES": "3"}, "train.nodes = 2, but this job has PET_NNODES = 3 machines"),
    ],
)
def test_a_machine_that_does_not_know_its_place_is_told_how_to(env: dict[str, str], message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        launch_args(1, 2, env)
