"""The controller's pure tensor functions: the math of METHOD.md sections 2-3."""

import torch

from tpcvit import controller as C


def _rand_probs(b=3, l=5, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, l, n, generator=g), torch.rand(b, l, n, generator=g)


def test_active_recursion_is_the_markov_chain_marginal():
    p, r = _rand_probs()
    a = C.active_probabilities(p, r)
    # Monte Carlo of the two-state chain agrees with the recursion
    torch.manual_seed(0)
    samples = 20000
    s = torch.ones(samples, *p[:, 0].shape)
    means = []
    for l in range(p.shape[1]):
        pause = torch.rand_like(s) < p[:, l]
        restart = torch.rand_like(s) < r[:, l]
        s = torch.where(s > 0, (~pause).float(), restart.float())
        means.append(s.mean(0))
    assert torch.allclose(torch.stack(means, dim=1), a, atol=0.02)


def test_break_probability_sums_to_ending_paused_and_reduces_to_halting_without_restart():
    p, r = _rand_probs()
    a = C.active_probabilities(p, r)
    b = C.break_probability(p, r)
    assert torch.allclose(b.sum(dim=1), 1 - a[:, -1], atol=1e-6)
    b0 = C.break_probability(p, torch.zeros_like(r))
    a0 = C.active_probabilities(p, torch.zeros_like(r))
    a0_prev = torch.cat([torch.ones_like(a0[:, :1]), a0[:, :-1]], dim=1)
    assert torch.allclose(b0, a0_prev * p, atol=1e-6)
    a_prev = torch.cat([torch.ones_like(a[:, :1]), a[:, :-1]], dim=1)
    assert (b >= 0).all() and (b <= a_prev * p + 1e-6).all()  # only an active token pauses; a restart undoes a break
    assert (b.sum(dim=1) < (a_prev * p).sum(dim=1)).all()  # with r > 0 some pauses are temporary (not halting)


def test_spatial_smoothing_clips_outliers_and_keeps_smooth_fields():
    probs = torch.full((1, 16, 2), 0.1)
    probs[0, 5, 0] = 0.9  # single outlier on a 4x4 grid
    out = C.spatial_smooth(probs, (4, 4), max_dev=0.2)
    assert out[0, 5, 0] < 0.5  # outlier no longer crosses the decision threshold
    assert torch.allclose(out[0, :, 1], probs[0, :, 1])  # constant channel unchanged
    assert torch.equal(C.spatial_smooth(probs, (4, 4), max_dev=1.0), probs)


def test_depth_smoothing_is_an_ema():
    prev, cur = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.allclose(C.depth_smooth(cur, prev, 0.25), torch.full((2, 3), 0.75))
    assert torch.equal(C.depth_smooth(cur, None, 0.25), cur)


def test_sample_events_threshold_and_straight_through_gradient():
    prob = torch.tensor([0.2, 0.49, 0.51, 0.9], requires_grad=True)
    ev = C.sample_events(prob, tau=1.0, threshold=0.5, noise=False)
    assert ev.tolist() == [0.0, 0.0, 1.0, 1.0]
    ev.sum().backward()
    assert (prob.grad > 0).all()
    torch.manual_seed(0)
    noisy = C.sample_events(torch.full((20000,), 0.3), tau=1.0, noise=True)
    assert abs(noisy.mean().item() - 0.3) < 0.02  # Gumbel-sigmoid samples Bernoulli(p)


def test_topk_states_keeps_exactly_k():
    score = torch.rand(4, 10, requires_grad=True)
    s = C.topk_states(score, 3)
    assert (s.detach().sum(1) == 3).all()
    kept = s.detach().bool()
    assert (score.detach()[kept].view(4, 3).min(1).values >= score.detach()[~kept].view(4, 7).max(1).values).all()
    s.sum().backward()
    assert score.grad is not None


def test_losses_are_zero_at_their_targets_and_positive_elsewhere():
    states = torch.ones(2, 4, 8) * torch.tensor([1, 0] * 4).float()
    assert C.budget_loss(states, 0.5).item() == 0.0
    assert C.budget_loss(states, 0.9).item() > 0
    prior = C.keep_prior(4, 0.5, 0.2)
    assert abs(prior.mean().item() - 0.5) < 1e-6 and prior[0] > prior[-1]
    a = prior.view(1, 4, 1).expand(2, 4, 8)
    assert C.distribution_loss(a, torch.zeros_like(a), 0.5, restart_prior=0.0).item() < 1e-6
    assert C.distribution_loss(torch.full_like(a, 0.95), torch.zeros_like(a), 0.5, 0.0).item() > 0.1
    with_restart = C.distribution_loss(a, torch.zeros_like(a), 0.5, restart_prior=0.1)
    assert with_restart.item() > 0.05  # no restarts at all is penalised against a 10% restart prior


def test_neighbour_mean_product_equals_border_aware_pooling():
    import torch.nn.functional as F

    for grid in ((7, 7), (4, 5), (1, 3)):
        n = grid[0] * grid[1]
        probs = torch.rand(3, n, 2)
        pooled = F.avg_pool2d(probs.transpose(1, 2).reshape(3, 2, *grid), 3, stride=1, padding=1,
                              count_include_pad=False).reshape(3, 2, n).transpose(1, 2)
        product = C.neighbour_mean_matrix(grid, probs.device, probs.dtype) @ probs
        assert torch.allclose(product, pooled, atol=1e-6)
        # the matrix is exactly 1/count at each 3x3 neighbour (rounded once from float64): the same bits as the
        # convolution-built definition, so switching how it is built changes no decision
        eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, *grid)
        sums = F.conv2d(eye, torch.ones(1, 1, 3, 3, dtype=torch.float64), padding=1).reshape(n, n)
        for dtype in (torch.float32, torch.bfloat16):
            C._NEIGHBOUR_MEANS.clear()
            expected = (sums.t() / sums.sum(dim=0)[:, None]).to(dtype)
            assert torch.equal(C.neighbour_mean_matrix(grid, probs.device, dtype), expected)
    # the clip uses it on small grids and pooling on large ones: the same rule either way
    small, large = torch.rand(2, 49, 2), torch.rand(2, 100, 2)
    for probs, grid in ((small, (7, 7)), (large, (10, 10))):
        out = C.spatial_smooth(probs, grid, 0.1)
        pooled = F.avg_pool2d(probs.transpose(1, 2).reshape(2, 2, *grid), 3, stride=1, padding=1,
                              count_include_pad=False).reshape(2, 2, -1).transpose(1, 2)
        assert torch.allclose(out, pooled + (probs - pooled).clamp(-0.1, 0.1), atol=1e-6)
    # one GEMM over the batch ([B, C, N] @ M.T) gives the bits of the per-image products M @ [N, C]
    matrix = C.neighbour_mean_matrix((7, 7), small.device, small.dtype)
    assert torch.equal(C.neighbour_mean_matrix((7, 7), small.device, small.dtype, True), matrix.t())
    for batch in (1, 5, 64):
        probs = torch.rand(batch, 49, 2)
        mean = matrix @ probs
        assert torch.equal(C.spatial_smooth(probs, (7, 7), 0.1), mean + (probs - mean).clamp(-0.1, 0.1))


def test_pooled_paused_keys_are_window_means_with_counts():
    from tpcvit.tokens import pool_paused, window_ids

    torch.manual_seed(0)
    patches, paused = torch.randn(2, 49, 3), torch.rand(2, 49) > 0.4
    means, counts = pool_paused(patches, paused, (7, 7), 2)
    ids = window_ids((7, 7), 2)
    assert means.shape == (2, 16, 3) and ids.max().item() == 15 and ids[48].item() == 15  # edge windows cut
    for b in range(2):
        for w in range(16):
            members = (ids == w) & paused[b]
            assert counts[b, w].item() == members.sum().item()
            if members.any():
                assert torch.allclose(means[b, w], patches[b, members].mean(dim=0), atol=1e-6)
