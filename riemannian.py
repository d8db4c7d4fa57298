"""The Riemannian sampler of Chadebec and Allassonnière 2022 ("A Geometric Perspective on
Variational Autoencoders", NeurIPS): the trained VAE as it is, z drawn from the density
proportional to sqrt(det G(z)) of a Riemannian metric built from the encoder's posteriors,

    G(z) = sum_i diag(1 / sigma_i^2) exp(-(z - c_i)^T diag(1 / sigma_i^2) (z - c_i) / T^2) + lambda I,

over K centroid codes c_i with their posterior standard deviations sigma_i, T the largest
distance from a centroid to its nearest other centroid, by Hamiltonian Monte Carlo started at
training codes. The settings are those of the authors' published code for MNIST
(github.com/clementchadebec/geometric_perspective_on_vaes, sampling.py and generate_data.py);
there is no maintained library of it (their pythae does not have it), hence this file.

Two departures, both measured on Fashion-MNIST (docs/RESULTS.md): their k-medoids needs every
pairwise distance of the codes (29 GB for 60,000), so the centroids are the codes nearest to
k-means' centres; and the chains start at STARTS codes drawn at random, stored with the
state, not at all of them. log det G is summed exactly (G is diagonal), where their code clamps
det G at 1e10 in the acceptance step.

Codes in, states and latents out; priors.py checks the codes and the state and calls this."""

import warnings

import torch

CENTROIDS = 100
RIDGE = 0.01  # lambda: the authors' value for MNIST and SVHN
HMC_ITERATIONS = 100
LEAPFROG_STEPS = 10
STEP_SIZE = 0.01
MOMENTUM_SD = 0.5  # their momentum draw; the kinetic energy stays |rho|^2 / 2, as in their code
STARTS = 20_000  # codes the chains start from, drawn at random and stored (float32: 10 MB at d = 128)

NUMBERS = ("n_centroids", "temperature", "ridge", "hmc_iterations", "leapfrog_steps", "step_size",
           "momentum_sd")


def fit(codes, code_sds, seed, n_centroids=CENTROIDS, starts=STARTS):
    """The metric's part of a state, from float64 (N, d) posterior means and standard deviations
    (checked by the caller); seeded k-means (scikit-learn), so a refit is the same. ValueError
    where the centroids coincide (no temperature)."""
    from sklearn.cluster import KMeans  # imported here: sklearn costs a second at startup
    from sklearn.exceptions import ConvergenceWarning

    k = min(n_centroids, codes.shape[0])
    with warnings.catch_warnings():  # fewer distinct codes than k: the duplicates merge below
        warnings.simplefilter("ignore", ConvergenceWarning)
        centres = KMeans(k, n_init=1, random_state=seed).fit(codes.numpy()).cluster_centers_
    nearest = torch.cdist(torch.from_numpy(centres), codes).argmin(1).unique()
    if nearest.numel() < 2:
        raise ValueError("the codes hold fewer than 2 distinct points: no metric to build")
    centroids, sds = codes[nearest], code_sds[nearest]
    gaps = torch.cdist(centroids, centroids) + torch.diag(torch.full((nearest.numel(),), float("inf"),
                                                                     dtype=codes.dtype))
    temperature = gaps.min(1).values.max().item()
    if not temperature > 0:
        raise ValueError("the centroid codes coincide: no temperature for the metric")
    order = torch.randperm(codes.shape[0], generator=torch.Generator().manual_seed(seed))[:starts]
    return {"n_centroids": int(nearest.numel()), "centroids": centroids, "inverse_variances": sds.pow(-2),
            "temperature": temperature, "ridge": RIDGE, "start_codes": codes[order].float(),
            "hmc_iterations": HMC_ITERATIONS, "leapfrog_steps": LEAPFROG_STEPS, "step_size": STEP_SIZE,
            "momentum_sd": MOMENTUM_SD}


class _Metric:
    """log sqrt(det G(z)) and its gradient for a batch of z, (n, d) float64."""

    def __init__(self, state, device):
        self.m = state["inverse_variances"].to(device, torch.float64)  # (K, d)
        centroids = state["centroids"].to(device, torch.float64)
        self.mc = self.m * centroids
        self.cmc = (self.mc * centroids).sum(1)  # (K,)
        self.t2, self.ridge = state["temperature"] ** 2, state["ridge"]

    def _weights_and_g(self, z):
        # (z - c_i)^T M_i (z - c_i) for every z and i, as three matrix products
        mahalanobis2 = (z * z) @ self.m.T - 2 * z @ self.mc.T + self.cmc
        weights = torch.exp(-mahalanobis2 / self.t2)  # (n, K)
        return weights, weights @ self.m + self.ridge  # the diagonal of G(z), (n, d)

    def log_density(self, z):
        return self.log_density_and_gradient(z)[0]

    def gradient(self, z):
        return self.log_density_and_gradient(z)[1]

    def log_density_and_gradient(self, z):
        # d/dz 0.5 sum_j log G_jj = -(1/T^2) sum_i w_i (sum_j M_ij / G_jj) M_i (z - c_i)
        weights, g = self._weights_and_g(z)
        a = weights * ((1 / g) @ self.m.T)
        return 0.5 * g.log().sum(1), -((a @ self.m) * z - a @ self.mc) / self.t2


def sample(state, n, generator, device):
    """n latents (n, d) float64 on `device`: one HMC chain each, started at a stored code drawn
    at random, the draws from `generator` (on `device`)."""
    metric = _Metric(state, device)
    starts = state["start_codes"]
    pick = torch.randint(0, starts.shape[0], (n,), generator=generator, device=device)
    z = starts.to(device, torch.float64)[pick]
    eps = state["step_size"]
    # the density and gradient at each chain's current z, carried from where it was last computed
    log_density, grad_z = metric.log_density_and_gradient(z)
    for _ in range(state["hmc_iterations"]):
        rho = state["momentum_sd"] * torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype)
        energy = -log_density + 0.5 * rho.pow(2).sum(1)
        z_new, grad = z, grad_z
        for _ in range(state["leapfrog_steps"]):
            rho = rho + 0.5 * eps * grad
            z_new = z_new + eps * rho
            new_log_density, grad = metric.log_density_and_gradient(z_new)
            rho = rho + 0.5 * eps * grad
        new_energy = -new_log_density + 0.5 * rho.pow(2).sum(1)
        accept = torch.rand(n, generator=generator, device=device, dtype=z.dtype) < torch.exp(energy - new_energy)
        z = torch.where(accept[:, None], z_new, z)
        log_density = torch.where(accept, new_log_density, log_density)
        grad_z = torch.where(accept[:, None], grad, grad_z)
    return z

