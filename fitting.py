"""Latent priors fitted to a trained model: its training images encoded to their posteriors,
each prior fitted to the means (the two-stage VAE to draws from the posteriors; priors.py) with
its progress shown, and the states returned for the caller to save. --fit_prior calls this on
a checkpoint; --train's loop on its final weights, before its final save (PriorsAfterTraining)."""

import time

import data
import util
from progress import Progress
from settings import GMM_CODES_PER_COMPONENT, GMM_COMPONENTS, TRAIN_PRIORS
from util import BadValue, UserError


class PriorsAfterTraining:
    """What --train does after its last epoch, before its final save: the priors of
    settings.TRAIN_PRIORS fitted to the new weights (the gmm, Ghosh et al.'s ex-post density
    estimation, and Chadebec and Allassonnière's Riemannian sampler), where a small training
    set lowers the number of gmm components instead of failing a finished run. training.train
    calls it, and asks it for its time left."""

    def __init__(self, record, train_images, latent_dim, n_components, n_codes, path):
        self.record, self.train_images, self.latent_dim, self.path = record, train_images, latent_dim, path
        self.n_components, self.max_codes, self.names = n_components, n_codes, TRAIN_PRIORS
        self.n_codes = min(n_codes or train_images.shape[0], train_images.shape[0])
        self.fit_seconds = None  # measured on first use (a fraction of a second), rank 0 only

    def seconds(self, encode_seconds_per_image):
        """Its estimated time: encoding every training image at the test pass's rate
        (an overestimate: the test pass also decodes), then the fits."""
        import priors
        if self.fit_seconds is None:
            n_all = self.train_images.shape[0]
            self.fit_seconds = sum(
                priors.gmm_fit_seconds(self.n_codes, self.latent_dim, min(
                    gmm_components(self.n_codes, self.n_components), self.n_codes)) if name == "gmm"
                else priors.riemannian_fit_seconds(n_all, self.latent_dim) for name in self.names)
        return self.train_images.shape[0] * encode_seconds_per_image + self.fit_seconds

    def __call__(self, model):
        try:
            return fitted_priors(model, self.record, self.names, self.train_images, self.n_components,
                                 self.max_codes, automatic=True)
        except UserError as e:
            error = e.extended(f"; {self.path} holds the trained weights without the "
                               f"{' and '.join(self.names)} prior{'s' if len(self.names) > 1 else ''}")
            for name in self.names:
                error = error.extended("", remedy=("fit_prior", {"prior": name, "path": self.path}))
            raise error from None


def gmm_components(n_codes, n_components=None):
    """The gmm prior's components for `n_codes` codes: `n_components` where given, else the
    default, one per GMM_CODES_PER_COMPONENT codes where that is fewer (at least one)."""
    if n_components is not None:
        return n_components
    return max(1, min(GMM_COMPONENTS, n_codes // GMM_CODES_PER_COMPONENT))


def fitted_priors(model, record, names, train_images, n_components, n_gmm_codes, automatic=False):
    """{name: state} of the named priors fitted to the training images' codes (the gmm to
    `n_gmm_codes` of them drawn at random, 0 meaning all, with `n_components`, None meaning
    gmm_components' default), each with the progress it makes shown. record: the checkpoint's
    TrainingRecord (None: weights only). automatic: after --train, where a small training set
    lowers a given number of GMM components instead of failing a finished run."""
    import metrics
    import priors
    images = data.binarize_fixed(train_images) if record is not None and record.binarize else train_images
    start = time.perf_counter()
    codes, code_sds = metrics.posterior_moments(model, images)
    encode_s = time.perf_counter() - start
    n_codes, dataset = codes.shape[0], model.config.dataset
    n_fit = {"gmm": min(n_gmm_codes or n_codes, n_codes), "two_stage": n_codes, "flow": n_codes,
             "riemannian": n_codes}
    seed = record.seed if record is not None else 0
    fitted = {}
    for name in names:
        what = {"two_stage": "posterior samples",
                "riemannian": "posterior means and standard deviations"}.get(name, "posterior means")
        fitted_on = (f"{what} of {'the ' if n_fit[name] == n_codes else ''}{n_fit[name]}"
                     f"{'' if n_fit[name] == n_codes else f' (drawn at random) of the {n_codes}'} "
                     f"{dataset} training images")
        print(f"fitting the {name} prior to the {fitted_on} ...", flush=True)
        start = time.perf_counter()
        try:
            if name == "gmm":
                k = gmm_components(n_fit[name], n_components)
                k = min(k, n_fit[name]) if automatic else k
                with Progress("gmm prior, EM", None, "iteration") as bar:
                    fitted[name] = priors.fit_gmm(codes, k, seed, fitted_on, n_fit[name], bar.update)
                if not fitted[name]["em_converged"]:
                    raise UserError(f"the gmm prior's EM did not converge in {priors.GMM_MAX_ITERATIONS} "
                                    "iterations", remedy=("fewer_components", {}))
                how = f"{k} full-covariance component{'' if k == 1 else 's'}, EM"
            elif name == "two_stage":
                with Progress("two-stage prior", priors.TWO_STAGE_EPOCHS, "epoch") as bar:
                    fitted[name] = priors.fit_two_stage(codes, seed, fitted_on, bar.update, code_sds=code_sds)
                how = "a second VAE on the codes (Dai and Wipf 2019)"
            elif name == "riemannian":  # k-means on the codes: seconds (riemannian_fit_seconds), no progress to show
                fitted[name] = priors.fit_riemannian(codes, code_sds, seed, fitted_on)
                how = (f"Chadebec and Allassonnière 2022's metric of {fitted[name]['n_centroids']} "
                       "centroids, sampled by HMC")
            else:
                with Progress("flow prior", priors.FLOW_EPOCHS, "epoch") as bar:
                    fitted[name] = priors.fit_flow(codes, seed, fitted_on, bar.update)
                how = (f"a masked autoregressive flow of {priors.FLOW_TRANSFORMS} transforms, "
                       f"{fitted[name]['mean_log_likelihood_nats']:.1f} nats per code")
        except ValueError as e:
            if name == "gmm" and n_components is not None and n_components > n_fit[name]:
                raise BadValue("prior_components", f"{n_components} is more than the {n_fit[name]} "
                               "training images the mixture is fitted to") from None
            raise UserError(f"could not fit the {name} prior: {util.first_line(e)}") from None
        print(f"fitted the {name} prior ({how}) to {fitted_on} in {time.perf_counter() - start:.1f} s "
              f"(encoding them took {encode_s:.1f} s)", flush=True)
    return {name: {**state, "dataset": dataset} for name, state in fitted.items()}
