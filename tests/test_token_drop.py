"""Continuous token dropping: per-image rates, stochastic rounding, at least one token kept."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import labelled_image

from navit import BetaRate, ConstantRate, ResolutionRate, TokenDropper, UniformRate

SIGMAS = 5.0  # statistical tests allow this many standard errors (false alarm ~ 6e-7)


def images_of(num_tokens: int, count: int):
    return [labelled_image(i, num_tokens, grid=(num_tokens, 1)) for i in range(count)]


def assert_mean_close(samples: torch.Tensor, mean: float, std: float, what: str = "") -> None:
    """The sample mean is within SIGMAS standard errors of ``mean`` (std of one sample: ``std``)."""
    tolerance = SIGMAS * std / math.sqrt(samples.numel())
    observed = samples.double().mean().item()
    assert abs(observed - mean) <= tolerance, f"{what}: mean {observed:.4f} vs {mean:.4f} ± {tolerance:.4f}"


def test_dropped_images_keep_a_sorted_subset_of_their_tokens_and_their_grid():
    images = [labelled_image(i, 12, grid=(3, 4)) for i in range(50)]
    dropped = TokenDropper(0.5, seed=0)(images)
    assert len(dropped) == len(images)
    for source, image in zip(images, dropped):
        kept = image.patches[:, 1].long()  # original token index of every kept token
        assert 1 <= image.num_tokens <= source.num_tokens
        assert torch.equal(kept, kept.sort().values.unique())
        assert torch.equal(image.patches, source.patches[kept])
        assert torch.equal(image.coords, source.coords[kept])
        assert image.grid == source.grid
    assert any(image.num_tokens < 12 for image in dropped)


@pytest.mark.parametrize("num_tokens", [1, 2, 5])
def test_never_empties_an_image(num_tokens):
    dropper = TokenDropper(0.99, seed=1)
    for image in dropper(images_of(num_tokens, 500)):
        assert image.num_tokens >= 1


@pytest.mark.parametrize(
    "rate, mean_rate, rate_var",
    [
        (ConstantRate(0.3), 0.3, 0.0),
        (UniformRate(0.1, 0.5), 0.3, 0.4**2 / 12),
        (BetaRate(mean=0.2, max_rate=0.8), 0.2, 0.8**2 * 0.25 * 0.75 / 5),
    ],
    ids=["constant", "uniform", "beta"],
)
def test_kept_fraction_matches_the_rate_in_expectation(rate, mean_rate, rate_var):
    # Stochastic rounding keeps (1 - rate)·n tokens on average, not a floor or a round of it.
    # Per image, Var(kept) <= n²·Var(rate) + 1/4 (the rounding is a Bernoulli on top).
    num_tokens, count = 7, 3000
    kept = torch.tensor([image.num_tokens for image in TokenDropper(rate, seed=2)(images_of(num_tokens, count))])
    std = math.sqrt(num_tokens**2 * rate_var + 0.25)
    assert_mean_close(kept, (1 - mean_rate) * num_tokens, std, what=type(rate).__name__)


def test_eval_mode_returns_images_unchanged():
    images = images_of(9, 20)
    dropper = TokenDropper(0.9, seed=0)
    assert dropper.eval() is dropper and not dropper.training
    assert dropper(images) is images
    assert dropper.train().training
    assert sum(image.num_tokens for image in dropper(images)) < 9 * 20


def test_the_seed_fixes_the_drops():
    images = images_of(16, 30)

    def kept(seed):
        return [image.patches[:, 1].tolist() for image in TokenDropper(UniformRate(0.2, 0.8), seed=seed)(images)]

    assert kept(5) == kept(5)
    assert kept(5) != kept(6)


def test_rate_zero_keeps_everything():
    images = images_of(10, 20)
    assert [image.num_tokens for image in TokenDropper(0.0)(images)] == [10] * 20


SAMPLES = 20_000


def sample(distribution, num_tokens=None, seed=0):
    tokens = torch.full((SAMPLES,), 100) if num_tokens is None else torch.full((SAMPLES,), num_tokens)
    rates = distribution.sample(tokens, torch.Generator().manual_seed(seed))
    assert rates.shape == (SAMPLES,)
    assert ((rates >= 0) & (rates < 1)).all()
    return rates


def test_constant_rate_samples_its_rate():
    assert (sample(ConstantRate(0.25)) == 0.25).all()


def test_uniform_rate_samples_its_interval():
    rates = sample(UniformRate(0.1, 0.6))
    assert rates.min() >= 0.1 and rates.max() < 0.6
    assert_mean_close(rates, 0.35, 0.5 / math.sqrt(12), "uniform")
    # Spread over the interval, not stuck at one value.
    assert rates.std().item() == pytest.approx(0.5 / math.sqrt(12), rel=0.05)


@pytest.mark.parametrize("mean, max_rate, concentration", [(0.2, 0.8, 4.0), (0.5, 0.9, 10.0)])
def test_beta_rate_has_its_mean_within_max_rate(mean, max_rate, concentration):
    rates = sample(BetaRate(mean=mean, max_rate=max_rate, concentration=concentration))
    assert rates.max() <= max_rate
    fraction = mean / max_rate
    std = max_rate * math.sqrt(fraction * (1 - fraction) / (concentration + 1))
    assert_mean_close(rates, mean, std, "beta")
    assert rates.std().item() == pytest.approx(std, rel=0.1)


def test_beta_rate_is_reproducible_and_leaves_the_global_rng_alone():
    distribution = BetaRate(mean=0.3, max_rate=0.9)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    first = sample(distribution, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    assert torch.equal(sample(distribution, seed=7), first)


def test_resolution_rate_mean_grows_with_token_count():
    distribution = ResolutionRate(rate_at_min=0.2, rate_at_max=0.6, min_tokens=16, max_tokens=256, std=0.05)
    # With the mean 4 std from the truncation bounds, the truncated mean is the linear one.
    for num_tokens, mean in [(4, 0.2), (16, 0.2), (136, 0.4), (256, 0.6), (1000, 0.6)]:
        rates = sample(distribution, num_tokens)
        assert_mean_close(rates, mean, 0.05, f"{num_tokens} tokens")
    means = [sample(distribution, n).mean().item() for n in (16, 64, 128, 200, 256)]
    assert means == sorted(means)


def test_resolution_rate_is_truncated_to_its_max_rate():
    distribution = ResolutionRate(rate_at_min=0.5, rate_at_max=0.8, min_tokens=1, max_tokens=2, std=0.5, max_rate=0.85)
    rates = sample(distribution, 2)
    assert rates.min() >= 0.0 and rates.max() <= 0.85
    assert rates.std() > 0.1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ConstantRate(1.0), r"rate must be in \[0, 1\), got 1.0"),
        (lambda: ConstantRate(-0.1), r"rate must be in \[0, 1\)"),
        (lambda: TokenDropper(1.5), r"rate must be in \[0, 1\), got 1.5"),
        (lambda: UniformRate(0.5, 0.2), "low=0.5 is above high=0.2"),
        (lambda: UniformRate(0.0, 1.0), r"high must be in \[0, 1\)"),
        (lambda: BetaRate(mean=0.5, max_rate=0.4), r"mean=0.5 must be in \(0, max_rate=0.4\)"),
        (lambda: BetaRate(mean=0.0, max_rate=0.4), "mean=0.0 must be in"),
        (lambda: BetaRate(mean=0.1, max_rate=0.4, concentration=0), "concentration must be > 0"),
        (lambda: ResolutionRate(0.1, 0.5, min_tokens=10, max_tokens=10), "need 1 <= min_tokens < max_tokens"),
        (lambda: ResolutionRate(0.1, 1.2, min_tokens=1, max_tokens=10), r"rate_at_max must be in \[0, 1\)"),
    ],
)
def test_invalid_rate_parameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_distribution_producing_rates_outside_the_unit_interval_is_rejected():
    class Broken:
        def sample(self, num_tokens, generator):
            return torch.ones(num_tokens.shape)

    with pytest.raises(ValueError, match=r"produced a rate outside \[0, 1\)"):
        TokenDropper(Broken())(images_of(4, 3))


def test_tube_dropping_removes_whole_tubes_of_clips_and_leaves_images_to_tokens():
    from navit import Example
    from navit.patchify import grid_coords

    coords = grid_coords(4, 3, 5)  # 4 time steps of a 3 x 5 grid
    clip = Example(torch.arange(60.0)[:, None], coords, (4, 3, 5))
    image = labelled_image(0, 15, grid=(3, 5))
    kept_clip, kept_image = TokenDropper(0.6, seed=0, tube=True)([clip, image])
    cells = kept_clip.coords[:, 1] * 5 + kept_clip.coords[:, 2]
    counts = torch.bincount(cells, minlength=15)
    assert set(counts.tolist()) == {0, 4}, "a cell is kept at every time step or at none"
    assert 3 <= int((counts == 4).sum()) <= 9 and kept_clip.grid == (4, 3, 5)
    assert kept_image.num_tokens < 15 and kept_image.num_axes == 2  # images drop single tokens
    plain = TokenDropper(0.6, seed=0)([clip])[0]
    assert set(torch.bincount(plain.coords[:, 1] * 5 + plain.coords[:, 2], minlength=15).tolist()) != {0, 4}
