import math

import pytest
import torch
import torch.nn.functional as F

from csc_serve.models.noise import add_gaussian_noise, estimate_noise_sigma

SIGMAS = [5, 10, 15, 25, 35, 50]
SIZE = 256


def gaussian_blur(x: torch.Tensor, width: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, H, W) with reflected borders."""
    radius = math.ceil(3 * width)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / width) ** 2)
    taps = taps / taps.sum()
    channels = x.shape[0]
    x = F.pad(x.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x[0]


def synthetic_image(channels: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """A noise-free (C, size, size) image in [0, 1] with the structure of a photograph.

    Smooth gradients for the sky, sharp-edged discs and rectangles for objects, and a patch of
    low-amplitude band-limited texture (blurred white noise) for grass or fabric; then half a pixel
    of blur, as a lens gives, since perfectly aliased step edges are no photograph.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    grid = torch.linspace(0, 1, size, dtype=torch.float64)
    y, x = torch.meshgrid(grid, grid, indexing="ij")  # (size, size) each
    direction = uniform(channels, 2, 1, 1) - 0.5
    image = 0.5 + 0.4 * (direction[:, 0] * x + direction[:, 1] * y)  # (C, size, size)
    image = image + 0.1 * torch.sin(2 * math.pi * (1 + 2 * uniform(1)) * x * y)
    for _ in range(4):
        centre, radius, colour = uniform(2), 0.05 + 0.15 * uniform(1), uniform(channels, 1, 1)
        disc = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 < radius**2).to(image.dtype)
        image = image * (1 - disc) + colour * disc
    for _ in range(3):
        (x0, y0), (w, h), colour = 0.8 * uniform(2), 0.1 + 0.3 * uniform(2), uniform(channels, 1, 1)
        box = ((x >= x0) & (x < x0 + w) & (y >= y0) & (y < y0 + h)).to(image.dtype)
        image = image * (1 - box) + colour * box
    texture = gaussian_blur(torch.randn(channels, size, size, generator=gen, dtype=torch.float64), 2.0)
    region = ((x > 0.5) & (y > 0.5)).to(image.dtype)
    image = image + region * 0.05 * texture / texture.std()
    return gaussian_blur(image, 0.5).clamp(0, 1).float()


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_estimate_is_within_ten_percent_of_true_sigma(sigma, channels, seed):
    clean = synthetic_image(channels, seed)
    noisy = add_gaussian_noise(clean, sigma, generator=torch.Generator().manual_seed(100 + seed))
    estimate = estimate_noise_sigma(noisy)
    assert estimate.shape == (1,) and estimate.dtype == torch.float64
    # 10 %: the accuracy that makes the estimate usable to pick a denoising strength.
    assert abs(estimate.item() - sigma) < 0.1 * sigma


@pytest.mark.parametrize("channels", [1, 3])
def test_clean_image_has_a_small_estimate(channels):
    estimate = estimate_noise_sigma(synthetic_image(channels, seed=0))
    # Below 2 grey levels: the texture and the edges must not read as noise.
    assert estimate.item() < 2.0


def test_batch_gets_one_estimate_per_image():
    sigmas = torch.tensor([5.0, 20.0, 50.0])
    clean = torch.stack([synthetic_image(3, seed) for seed in range(3)])  # (3, 3, H, W)
    noisy = add_gaussian_noise(clean, sigmas, generator=torch.Generator().manual_seed(0))
    estimate = estimate_noise_sigma(noisy)
    assert estimate.shape == (3,)
    # Same 10 % as the single-image test: each image is estimated on its own.
    torch.testing.assert_close(estimate, sigmas.double(), rtol=0.1, atol=0)


@pytest.mark.parametrize("patch_size", [5, 8])
def test_other_patch_sizes_also_estimate_sigma(patch_size):
    noisy = add_gaussian_noise(synthetic_image(3, seed=2), 15, generator=torch.Generator().manual_seed(0))
    # Same 10 % as the default patch size.
    assert abs(estimate_noise_sigma(noisy, patch_size).item() - 15) < 1.5


@pytest.mark.parametrize("sigma", [5, 25])
def test_added_noise_has_the_requested_std(sigma):
    clean = torch.full((2, 3, 128, 128), 0.5)
    noisy = add_gaussian_noise(clean, sigma, generator=torch.Generator().manual_seed(0))
    # 98k samples: the sample std is within 0.5 % of the true one (about 2 standard errors).
    torch.testing.assert_close((noisy - clean).std().item() * 255, float(sigma), rtol=0.005, atol=0)


def test_added_noise_is_neither_clipped_nor_rounded():
    clean = torch.stack([torch.zeros(1, 64, 64), torch.ones(1, 64, 64)])  # (2, 1, 64, 64)
    noisy = add_gaussian_noise(clean, 25, generator=torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.float32
    assert (noisy[0] < 0).any() and (noisy[1] > 1).any()
    assert not torch.equal(noisy * 255, (noisy * 255).round())


def test_same_generator_seed_gives_the_same_noise():
    clean = synthetic_image(3, seed=0)[:, :64, :64]

    def noisy(seed):
        return add_gaussian_noise(clean, 15, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(noisy(3), noisy(3), rtol=0, atol=0)
    assert not torch.equal(noisy(3), noisy(4))


def test_per_image_sigma_scales_each_image():
    clean = torch.zeros(3, 1, 32, 32)
    sigmas = torch.tensor([0.0, 10.0, 30.0])
    noisy = add_gaussian_noise(clean, sigmas, generator=torch.Generator().manual_seed(0))
    unit = add_gaussian_noise(clean, 255.0, generator=torch.Generator().manual_seed(0))
    # Same draw, scaled per image: equal up to float32 rounding.
    torch.testing.assert_close(noisy, unit * sigmas.view(-1, 1, 1, 1) / 255, rtol=1e-6, atol=1e-7)


def test_integer_images_are_noised_in_float():
    noisy = add_gaussian_noise(torch.zeros(1, 8, 8, dtype=torch.uint8), 10)
    assert noisy.is_floating_point()


@pytest.mark.parametrize(
    "shape,patch_size",
    [((3, 20, 20), 7), ((1, 3, 10, 100), 7), ((1, 1, 5, 5), 7), ((1, 1, 30, 30), 1)],
    ids=["rgb-too-small", "too-few-patches", "smaller-than-patch", "patch-too-small"],
)
def test_estimate_rejects_images_too_small(shape, patch_size):
    with pytest.raises(ValueError, match="too small|at least"):
        estimate_noise_sigma(torch.rand(shape), patch_size)


@pytest.mark.parametrize("shape", [(64, 64), (1, 1, 1, 64, 64)])
def test_estimate_rejects_wrong_rank(shape):
    with pytest.raises(ValueError, match="must be"):
        estimate_noise_sigma(torch.rand(shape))


@pytest.mark.parametrize("sigma_shape", [(2,), (3, 1)])
def test_add_noise_rejects_mismatched_sigma(sigma_shape):
    with pytest.raises(ValueError, match="sigma"):
        add_gaussian_noise(torch.zeros(3, 1, 8, 8), torch.ones(sigma_shape))
