"""Latent priors fitted after training (priors.py): fitting, seeding, saving, checking, sampling."""

import io
import math

import numpy as np
import pytest
import torch

import priors
import vae

# A known 3-component mixture in 4 dimensions, far enough apart for EM to find it.
TRUE_WEIGHTS = np.array([0.5, 0.3, 0.2])
TRUE_MEANS = np.array([[0.0, 0.0, 0.0, 0.0], [6.0, 0.0, -3.0, 1.0], [0.0, -6.0, 3.0, 2.0]])


def mixture_codes(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    component = rng.choice(3, size=n, p=TRUE_WEIGHTS)
    scales = np.array([1.0, 0.5, 0.8])[component, None]
    return torch.from_numpy(TRUE_MEANS[component] + scales * rng.normal(size=(n, 4))).float()


def correlated_codes(n=4000, seed=0):
    """2-D Gaussian codes, mean (1, -2), correlation 0.9."""
    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, 0.9], [0.9, 1.0]])
    return torch.from_numpy(rng.multivariate_normal([1.0, -2.0], cov, size=n)).float()


@pytest.fixture(scope="module")
def gmm_state():
    return priors.fit_gmm(mixture_codes(), n_components=3, seed=0, fitted_on="mixture test codes")


@pytest.fixture(scope="module")
def two_stage_state():
    # A tiny budget: enough for a 2-D Gaussian, a few seconds on one core.
    return priors.fit_two_stage(correlated_codes(), seed=0, fitted_on="correlated test codes",
                                width=64, epochs=30, batch_size=128, learning_rate=3e-3)


def fit_small_flow(codes=None, **kwargs):
    # A small flow and a short fit: enough for 3 separated modes in 4-D, a few seconds on one core.
    return priors.fit_flow(mixture_codes() if codes is None else codes, **{
        "seed": 0, "fitted_on": "mixture test codes", "transforms": 3, "hidden": (64, 64),
        "epochs": 40, "batch_size": 128, "learning_rate": 3e-3, **kwargs})


@pytest.fixture(scope="module")
def flow_state():
    return fit_small_flow()


def mixture_sds(codes, seed=0):
    """Posterior standard deviations for mixture_codes: 0.2-0.5, one per code and dimension."""
    return 0.2 + 0.3 * torch.rand(codes.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def riemannian_state():
    codes = mixture_codes()
    return priors.fit_riemannian(codes, mixture_sds(codes), seed=0, fitted_on="mixture test codes")


def samples(state, n=2000, seed=0, **kwargs):
    return priors.sample_latents(state, n, generator=torch.Generator().manual_seed(seed), **kwargs)


def round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------- fitting

def test_gmm_recovers_a_known_mixture(gmm_state):
    order = np.argsort(gmm_state["weights"].numpy())[::-1]  # true weights are in falling order
    assert gmm_state["weights"].numpy()[order] == pytest.approx(TRUE_WEIGHTS, abs=0.03)
    assert np.abs(gmm_state["means"].numpy()[order] - TRUE_MEANS).max() < 0.15
    assert gmm_state["em_converged"]
    assert {k: gmm_state[k] for k in ("kind", "n_components", "n_codes", "latent_dim", "seed", "fitted_on")} \
        == {"kind": "gmm", "n_components": 3, "n_codes": 3000, "latent_dim": 4, "seed": 0,
            "fitted_on": "mixture test codes"}
    assert gmm_state["covariances"].dtype == torch.float64


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            assert_same_state(value, b[key])
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.long
def test_refitting_with_the_same_seed_gives_the_same_prior(gmm_state, two_stage_state, flow_state):
    assert_same_state(flow_state, fit_small_flow())
    assert_same_state(gmm_state, priors.fit_gmm(mixture_codes(), 3, seed=0, fitted_on="mixture test codes"))
    refit = priors.fit_two_stage(correlated_codes(), seed=0, fitted_on="correlated test codes",
                                 width=64, epochs=30, batch_size=128, learning_rate=3e-3)
    assert_same_state(two_stage_state, refit)


def test_two_stage_samples_match_the_codes_moments(two_stage_state):
    z = samples(two_stage_state, 5000).double()
    assert z.mean(0).numpy() == pytest.approx([1.0, -2.0], abs=0.15)
    cov = np.cov(z.numpy(), rowvar=False)
    assert cov == pytest.approx(np.array([[1.0, 0.9], [0.9, 1.0]]), abs=0.2)
    assert two_stage_state["decoder_gamma"] < 0.5  # gamma fell from 1: the decoder explains the codes


def test_two_stage_fitted_to_posterior_samples_sees_their_spread(two_stage_state):
    # Trained on fresh draws means + sds * eps (Dai and Wipf), not on the means: with every
    # posterior's sd 0.5, the stage-2 decoder's learned noise gamma takes up that spread, and
    # ends well above the fit to the means alone (0.61 against 0.36 when written).
    means = correlated_codes()
    state = priors.fit_two_stage(means, seed=0, fitted_on="correlated test codes", width=64, epochs=30,
                                 batch_size=128, learning_rate=3e-3, code_sds=torch.full_like(means, 0.5))
    assert 0.4 < state["decoder_gamma"] < 0.8
    assert state["decoder_gamma"] > two_stage_state["decoder_gamma"] + 0.15
    z = samples(state, 5000).double()
    assert z.mean(0).numpy() == pytest.approx([1.0, -2.0], abs=0.15)


def test_two_stage_refuses_sds_that_do_not_fit_the_codes():
    codes = correlated_codes(100)
    for sds, why in ((torch.ones(100, 3), "shape"), (-torch.ones(100, 2), "non-negative"),
                     (torch.full((100, 2), float("nan")), "NaN")):
        with pytest.raises(ValueError, match=why):
            priors.fit_two_stage(codes, epochs=1, code_sds=sds)


def test_flow_samples_put_the_modes_weights_where_the_codes_have_them(flow_state):
    z = samples(flow_state, 5000).double().numpy()
    nearest = np.linalg.norm(z[:, None, :] - TRUE_MEANS[None], axis=2).argmin(1)
    assert np.bincount(nearest, minlength=3) / len(z) == pytest.approx(TRUE_WEIGHTS, abs=0.04)
    # Better than any single Gaussian: the best one's mean log-likelihood of the same codes.
    codes = mixture_codes().double()
    gaussian = torch.distributions.MultivariateNormal(codes.mean(0), torch.cov(codes.T))
    assert flow_state["mean_log_likelihood_nats"] > gaussian.log_prob(codes).mean().item() + 1.0
    assert {k: flow_state[k] for k in ("kind", "n_codes", "latent_dim", "transforms", "hidden")} \
        == {"kind": "flow", "n_codes": 3000, "latent_dim": 4, "transforms": 3, "hidden": [64, 64]}


def test_flow_reports_progress_once_per_epoch():
    calls = []
    fit_small_flow(mixture_codes(300), epochs=3, progress=lambda *a: calls.append(a))
    assert [done for done, _ in calls] == [1, 2, 3] and "nats mean log-likelihood" in calls[-1][1]


def test_two_stage_reports_progress_once_per_epoch():
    calls = []
    priors.fit_two_stage(correlated_codes(200), width=8, epochs=3, progress=lambda *a: calls.append(a))
    assert [done for done, _ in calls] == [1, 2, 3] and "nats per code" in calls[-1][1]


def test_gmm_reports_every_em_iteration():
    calls = []
    state = priors.fit_gmm(mixture_codes(), 3, seed=0, progress=lambda *a: calls.append(a))
    assert [done for done, _ in calls] == list(range(1, state["em_iterations"] + 1))
    assert "log-likelihood change" in calls[-1][1]


def test_gmm_on_a_subsample_fits_that_many_codes_and_still_finds_the_modes():
    codes = mixture_codes()
    state = priors.fit_gmm(codes, 3, seed=0, max_codes=len(codes) // 4)
    assert state["n_codes"] == len(codes) // 4
    full = priors.fit_gmm(codes, 3, seed=0)

    def means_in_order(s):
        return s["means"][s["means"][:, 0].argsort()]
    assert torch.allclose(means_in_order(state), means_in_order(full), atol=0.3)
    assert_same_state(state, priors.fit_gmm(codes, 3, seed=0, max_codes=len(codes) // 4))


@pytest.mark.parametrize("n_components", [0, -1, 3001, 2.5, True])
def test_gmm_refuses_impossible_component_counts(n_components):
    with pytest.raises(ValueError, match="n_components"):
        priors.fit_gmm(mixture_codes(), n_components=n_components)


def test_riemannian_samples_stay_in_the_codes_modes_without_copying_the_codes(riemannian_state):
    codes = mixture_codes()
    z = samples(riemannian_state, 1000).double()
    distance_to_modes = torch.cdist(z, torch.from_numpy(TRUE_MEANS))
    assert (distance_to_modes.min(1).values < 3).double().mean() > 0.97  # the modes' scales are 0.5-1
    shares = torch.bincount(distance_to_modes.argmin(1), minlength=3).double() / z.shape[0]
    assert torch.allclose(shares, torch.from_numpy(TRUE_WEIGHTS), atol=0.05)
    # every chain moved off the code it started from (HMC, not a resampling of the codes)
    assert (torch.cdist(z, codes.double()).min(1).values > 1e-3).double().mean() > 0.99


def test_riemannian_gradient_is_that_of_its_log_density(riemannian_state):
    import riemannian
    metric = riemannian._Metric(riemannian_state, "cpu")
    z = (torch.from_numpy(TRUE_MEANS) + torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
         ).requires_grad_()
    metric.log_density(z).sum().backward()
    assert torch.allclose(metric.gradient(z.detach()), z.grad, rtol=1e-9, atol=1e-9)
    assert z.grad.abs().max() > 1e-3  # the metric is not flat where the codes are


def test_riemannian_refuses_sds_that_do_not_fit_the_codes():
    codes = correlated_codes(100)
    for sds, why in ((torch.ones(100, 3), "shape"), (torch.zeros(100, 2), "positive"),
                     (torch.full((100, 2), float("nan")), "code_sds contain NaN")):
        with pytest.raises(ValueError, match=why):
            priors.fit_riemannian(codes, sds)
    with pytest.raises(ValueError, match="distinct"):
        priors.fit_riemannian(torch.ones(20, 2), torch.ones(20, 2))
    with pytest.raises(ValueError, match="n_centroids"):
        priors.fit_riemannian(codes, torch.ones(100, 2), n_centroids=1)


@pytest.mark.parametrize("codes", [torch.zeros(10), torch.zeros(1, 3), torch.full((5, 2), math.nan),
                                   torch.zeros(5, 2, dtype=torch.int64)])
def test_fits_refuse_malformed_codes(codes):
    with pytest.raises(ValueError, match="codes"):
        priors.fit_gmm(codes, n_components=1)
    with pytest.raises(ValueError, match="codes"):
        priors.fit_two_stage(codes, epochs=1)
    with pytest.raises(ValueError, match="codes"):
        priors.fit_flow(codes, epochs=1)
    with pytest.raises(ValueError, match="codes"):
        priors.fit_riemannian(codes, torch.ones(codes.shape))


@pytest.mark.parametrize("record", [{"seed": -1}, {"seed": 1.5}, {"seed": 2**32}, {"fitted_on": None}])
def test_fits_refuse_a_bad_seed_or_description(record):
    for fit in (priors.fit_gmm, priors.fit_two_stage, priors.fit_flow):
        with pytest.raises(ValueError, match="seed|fitted_on"):
            fit(correlated_codes(50), **record)
    with pytest.raises(ValueError, match="seed|fitted_on"):
        priors.fit_riemannian(correlated_codes(50), torch.ones(50, 2), **record)


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("kind", ["gmm", "two_stage", "flow", "riemannian", "standard"])
def test_samples_are_seeded(kind, gmm_state, two_stage_state, flow_state, riemannian_state):
    state = {"gmm": gmm_state, "two_stage": two_stage_state, "flow": flow_state,
             "riemannian": riemannian_state, "standard": priors.standard_prior(3)}[kind]
    a, b, other = samples(state, 50, seed=1), samples(state, 50, seed=1), samples(state, 50, seed=2)
    assert a.shape == (50, state["latent_dim"]) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, other)


def test_state_survives_a_weights_only_round_trip(gmm_state, two_stage_state, flow_state, riemannian_state):
    for state in (gmm_state, two_stage_state, flow_state, riemannian_state):
        loaded = round_trip(state)
        assert_same_state(state, loaded)
        assert torch.equal(samples(state, 100), samples(loaded, 100))


def test_gmm_samples_follow_the_mixture(gmm_state):
    z = samples(gmm_state, 20000, seed=3).double().numpy()
    nearest = np.argmin(((z[:, None] - TRUE_MEANS[None]) ** 2).sum(-1), axis=1)
    assert np.bincount(nearest, minlength=3) / len(z) == pytest.approx(TRUE_WEIGHTS, abs=0.02)


def test_no_state_is_the_vaes_own_prior():
    torch.manual_seed(0)
    model = vae.VanillaVAE(vae.VAEConfig(dataset="mnist", image_shape=(1, 28, 28), latent_dim=4,
                                         hidden_dims=(8, 16))).eval()
    z = samples(None, 6, latent_dim=4)
    with torch.no_grad():
        images = model.mean_image(model.decode(z))
    assert torch.equal(images, model.sample(6, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="latent_dim"):
        priors.sample_latents(None, 6)


def test_sampling_checks_the_state_and_the_count(gmm_state):
    with pytest.raises(ValueError, match="4-dimensional codes, not the model.s 5"):
        samples(gmm_state, latent_dim=5)
    with pytest.raises(ValueError, match="positive integer"):
        samples(gmm_state, n=0)


# ---------------------------------------------------------------- check_prior

def broken(state, **changes):
    state = {**state, **changes}
    return {k: v for k, v in state.items() if v is not None}


def test_well_formed_states_pass(gmm_state, two_stage_state, flow_state):
    priors.check_prior(gmm_state, 4)
    priors.check_prior(round_trip(flow_state), 4)
    priors.check_prior(two_stage_state, 2)
    priors.check_prior(priors.standard_prior(7), 7)
    priors.check_prior(round_trip(gmm_state), 4)


def malformed_gmm_cases(gmm):
    covariances, weights = gmm["covariances"], gmm["weights"]
    not_pd = covariances.clone()
    not_pd[0] = torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64))
    asymmetric = covariances.clone()
    asymmetric[1, 0, 1] += 0.5
    nan_means = gmm["means"].clone()
    nan_means[2, 3] = math.nan
    return {
        "wrong kind": (broken(gmm, kind="maf"), "kind"),
        "not a dict": ([1, 2], "kind"),
        "missing key": (broken(gmm, covariances=None), "missing covariances"),
        "weights shape": (broken(gmm, weights=weights[:2]), "weights"),
        "means shape": (broken(gmm, means=gmm["means"][:, :3]), "means"),
        "covariance shape": (broken(gmm, covariances=covariances[:, :3, :3]), "covariances"),
        "not positive definite": (broken(gmm, covariances=not_pd), "positive definite"),
        "asymmetric": (broken(gmm, covariances=asymmetric), "symmetric"),
        "NaN": (broken(gmm, means=nan_means), "finite"),
        "weights off 1": (broken(gmm, weights=weights * 0.9), "sum to 1"),
        "negative weight": (broken(gmm, weights=weights * torch.tensor([2.0, -1.0, 1.0], dtype=torch.float64)),
                            "non-negative"),
        "count mismatch": (broken(gmm, n_components=4), "weights"),
        "list not tensor": (broken(gmm, weights=weights.tolist()), "weights"),
    }


def test_check_prior_rejects_malformed_gmm(gmm_state):
    for case, (state, message) in malformed_gmm_cases(gmm_state).items():
        with pytest.raises(ValueError, match=message):
            priors.check_prior(state, 4)
            pytest.fail(f"accepted: {case}")


def test_check_prior_rejects_latent_dim_mismatch(gmm_state, two_stage_state, flow_state):
    for state, wrong_dim in ((gmm_state, 8), (two_stage_state, 3), (flow_state, 5),
                             (priors.standard_prior(2), 3)):
        with pytest.raises(ValueError, match=f"not the model's {wrong_dim}"):
            priors.check_prior(state, wrong_dim)


def test_check_prior_rejects_malformed_two_stage(two_stage_state):
    decoder = two_stage_state["decoder"]
    nan_weight = {**decoder, "out.weight": decoder["out.weight"].clone().fill_(math.nan)}
    cases = [(broken(two_stage_state, decoder=nan_weight), "finite"),
             (broken(two_stage_state, width=32), "out.weight|hidden"),
             (broken(two_stage_state, depth=0), "depth"),
             (broken(two_stage_state, decoder={k: v for k, v in decoder.items() if k != "log_gamma"}),
              "exactly"),
             (broken(two_stage_state, decoder=None), "missing decoder")]
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            priors.check_prior(state, 2)


def test_check_prior_rejects_malformed_riemannian(riemannian_state):
    state = round_trip(riemannian_state)
    priors.check_prior(state, 4)
    k = state["n_centroids"]
    cases = [(broken(state, inverse_variances=-state["inverse_variances"]), "inverse_variances must be positive"),
             (broken(state, centroids=state["centroids"][:, :3]), "centroids"),
             (broken(state, n_centroids=k + 1), "centroids"),
             (broken(state, start_codes=state["start_codes"][:, :3]), "start_codes"),
             (broken(state, start_codes=torch.zeros(0, 4)), "start_codes"),
             (broken(state, temperature=0.0), "temperature"),
             (broken(state, step_size=1), "step_size"),
             (broken(state, hmc_iterations=0), "hmc_iterations"),
             (broken(state, hmc_iterations=2**70), "hmc_iterations must be at most 100000"),  # not a hang
             (broken(state, leapfrog_steps=2**70), "leapfrog_steps must be at most 10000"),
             (broken(state, ridge=None), "missing ridge")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            priors.check_prior(bad, 4)
    with pytest.raises(ValueError, match="not the model's 5"):
        priors.check_prior(state, 5)


def test_check_prior_rejects_malformed_flow(flow_state):
    flow = flow_state["flow"]
    weight = next(name for name, t in flow.items() if t.is_floating_point() and t.dim() == 2)
    mask = next(name for name, t in flow.items() if t.dtype == torch.bool)
    cases = [(broken(flow_state, flow={**flow, weight: flow[weight].clone().fill_(math.nan)}), "finite"),
             (broken(flow_state, flow={**flow, weight: flow[weight][:1]}), "shape"),
             (broken(flow_state, flow={**flow, mask: ~flow[mask]}), "buffer"),
             (broken(flow_state, flow={k: v for k, v in flow.items() if k != weight}), "exactly"),
             (broken(flow_state, transforms=2), "exactly"),
             (broken(flow_state, hidden=[64, "64"]), "hidden"),
             (broken(flow_state, hidden=[]), "hidden"),
             (broken(flow_state, scale=-flow_state["scale"]), "scale must be positive"),
             (broken(flow_state, shift=flow_state["shift"][:3]), "shift"),
             (broken(flow_state, flow=None), "missing flow")]
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            priors.check_prior(state, 4)
