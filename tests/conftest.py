import pytest
import torch

from csc_serve.models import CSCAutoencoder, CSCConfig, StageConfig


def tiny_config(**overrides) -> CSCConfig:
    """Two stages (stride 1 then 2), RGB, a few FISTA steps each: small enough for every test."""
    fields = dict(
        in_channels=3,
        stages=(
            StageConfig(num_atoms=6, kernel_size=5, stride=1, lmbda=0.05, num_steps=4),
            StageConfig(num_atoms=8, kernel_size=3, stride=2, lmbda=0.05, num_steps=3),
        ),
    )
    fields.update(overrides)
    return CSCConfig(**fields)


@pytest.fixture
def tiny_model() -> CSCAutoencoder:
    torch.manual_seed(0)
    return CSCAutoencoder(tiny_config()).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on one PyTorch thread: a second only adds contention (power iterations run many times
    slower) beside the threads the service starts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

