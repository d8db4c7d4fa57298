"""FID, KID, precision and recall of uint8 sample tensors (N, C, H, W) against a named dataset's
test images, as --eval scores a prior's samples: for samples made where the Inception file is
not, such as the GPU device check's (benchmarks/device_check.py, docs/BENCHMARKS.md).

    python -m benchmarks.score_samples samples_gmm.pt samples_riemannian.pt --dataset fashionmnist"""

import argparse
import sys

import torch

import data
import fid


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("samples", nargs="+", help="torch files, each a uint8 tensor (N, C, H, W)")
    p.add_argument("--dataset", default="fashionmnist", help="whose test images (default: fashionmnist)")
    p.add_argument("--data_dir", default="./data", help="where it is, and the features are cached (default: ./data)")
    p.add_argument("--fid_precision", choices=("fp32", "bf16"), default="fp32",
                   help="the Inception network's arithmetic (default: fp32, the literature's)")
    args = p.parse_args(argv)
    test_images, _ = data.load_test_images(args.dataset, args.data_dir)
    net = fid.load_network("cpu")
    reference = fid.reference_features(net, test_images, args.data_dir,
                                       f"{args.dataset}_{test_images.shape[-1]}px_test", precision=args.fid_precision)
    print(f"against the {test_images.shape[0]} {args.dataset} test images; {fid.protocol(args.fid_precision)}")
    for path in args.samples:
        samples = torch.load(path, weights_only=True)
        figures = fid.sample_quality(reference, fid.features(net, samples, precision=args.fid_precision))
        print(f"{path}: {samples.shape[0]} samples, FID {figures['fid']:.2f}, KID x 1000 "
              f"{1000 * figures['kid']:.2f} +- {1000 * figures['kid_std']:.2f}, precision "
              f"{figures['precision']}, recall {figures['recall']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
