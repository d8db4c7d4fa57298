"""The prepared check for the first minutes on a GPU machine: every CUDA path VanVAE has, in one
run of at most 8 minutes, with one log and the samples to score on a CPU afterwards.

    python -m benchmarks.device_check --out $OUT                    # on the GPU machine
    python -m benchmarks.device_check --out /tmp/check --dry-run    # here: every step, tiny, on the CPU

Steps (each under its own time limit; a failed step is logged and the next one runs, so one
fault does not spend the loan):
  1. the machine: nvidia-smi, the GPU, torch's CUDA, the versions of what VanVAE imports
  2. what the machine's python lacks (zuko) installed from the wheels carried in --wheels
  3. Fashion-MNIST unpacked from the four .gz files carried in --fashion_gz
  4. the tests marked `device` (tests/test_device.py) on the device
  5. bench.py: VanVAE's step and sampling beside GenerativeZoo's pipeline, images/s and ratio
  6. the default model trained 100 epochs with --device cuda, its priors fitted, then 10,000
     samples of each prior, timed, as uint8 tensors in --out (FID on a CPU: docs/BENCHMARKS.md)
     and --eval's IW bound (K=100) over the test set
  7. torchrun --nproc_per_node=1 (NCCL): one epoch, then resumed to two
The log is --out/device_check.log; docs/BENCHMARKS.md says what to carry and how to score."""

import argparse
import gzip
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")
# module: the package that brings it, of what VanVAE and its tests import that the GPU machine's
# python may lack (benchmarks/prepare_device.sh downloads their wheels)
NEEDED = {"zuko": "zuko", "pytest": "pytest", "iniconfig": "iniconfig", "pluggy": "pluggy", "packaging": "packaging"}
SAMPLES = 10_000  # per prior, the literature's FID-10k


class Log:
    """Everything printed goes to the screen and to one file."""

    def __init__(self, path):
        self.file = open(path, "a", buffering=1)

    def __call__(self, text):
        print(text, flush=True)
        self.file.write(text + "\n")


DEADLINE = [float("inf")]  # time.perf_counter() by which every step must have ended (--budget_s)


def run(log, argv, limit_s, env=None):
    """Run argv from the repository root under a time limit (cut to what is left of the whole
    check's budget), its output into the log; True if it exited 0."""
    log(f"$ {shlex.join(map(str, argv))}")
    start = time.perf_counter()
    limit_s = int(min(limit_s, DEADLINE[0] - start))
    if limit_s < 5:
        log("  -> skipped: the check's --budget_s is spent")
        return False
    try:
        proc = subprocess.run(list(map(str, argv)), cwd=ROOT, env={**os.environ, **(env or {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit_s)
        output, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:  # its output so far comes as bytes, text=True or not
        output, code = (e.stdout or b"").decode(errors="replace"), None
    for line in output.splitlines():
        log(f"  {line}")
    log(f"  -> {'exit ' + str(code) if code is not None else f'stopped at its {limit_s} s limit'} "
        f"in {time.perf_counter() - start:.1f} s")
    return code == 0


def machine(log, args):
    import torch
    log(f"python {sys.version.split()[0]}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version() if torch.cuda.is_available() else None}")
    for name in ("torchvision", "numpy", "scipy", "sklearn", "matplotlib", "tqdm", "tensorboard", "zuko", "PIL"):
        spec = importlib.util.find_spec(name)
        version = "absent"
        if spec is not None:
            try:
                version = getattr(__import__(name), "__version__", "present")
            except Exception as e:  # a broken install: say so and go on
                version = f"broken ({type(e).__name__}: {e})"
        log(f"  {name} {version}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        log(f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}, "
            f"{torch.cuda.device_count()} device(s)")
    else:
        log("GPU: none (torch.cuda.is_available() is False)")
    if shutil.which("nvidia-smi"):
        return run(log, ["nvidia-smi"], 30)
    log("nvidia-smi: not on PATH")
    return not args.device == "cuda"


def install_wheels(log, args):
    """Each missing module's wheel unpacked into a folder put first on PYTHONPATH for every later
    step: they are pure-Python wheels, for which that is an install, and it needs no pip."""
    missing = [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]
    if not missing:
        log(f"nothing to install: {', '.join(NEEDED)} importable")
        return True
    site = Path(args.work) / "site-packages"
    for package in missing:
        wheels = sorted(Path(args.wheels).glob(f"{package}-*.whl"))
        if not wheels:
            log(f"missing {package}, and no {package}-*.whl in {args.wheels} (benchmarks/prepare_device.sh)")
            return False
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extractall(site)
        log(f"installed {wheels[-1].name} into {site}")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(site))
    return True


def unpack_fashion(log, args):
    """The four upstream .gz files into <data>/FashionMNIST/raw/, as torchvision's download leaves
    them, so VanVAE reads them with download=False."""
    raw = Path(args.data) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_FILES:
        source, target = Path(args.fashion_gz) / f"{name}.gz", raw / name
        if target.is_file():
            continue
        if not source.is_file():
            log(f"no {source}: carry the four Fashion-MNIST .gz files (docs/BENCHMARKS.md)")
            return False
        with gzip.open(source, "rb") as fin, open(target.with_suffix(".part"), "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(target.with_suffix(".part"), target)
    log(f"Fashion-MNIST in {raw}: {', '.join(sorted(p.name for p in raw.iterdir()))}")
    return True


def tiny_fashion_array(args, n):
    """The first n Fashion-MNIST training images as a .npy file: the dry run's dataset, so a CPU
    trains it in seconds through the same own-images path a user's array takes."""
    import numpy as np
    path = Path(args.work) / f"fashion_{n}.npy"
    with open(Path(args.data) / "FashionMNIST" / "raw" / "train-images-idx3-ubyte", "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    np.save(path, images[:, None])
    return path


def vanvae(*flags):
    return [sys.executable, "VanVAE.py", *flags]


def train_and_sample(log, args):
    dataset = "fashionmnist" if not args.dry_run else tiny_fashion_array(args, 512)
    checkpoint = Path(args.work) / "VanillaVAE_fashionmnist.pt"
    common = ["--data_dir", args.data, "--output_dir", args.work, "--device", args.device]
    ok = run(log, vanvae("--train", "--dataset", dataset, "--checkpoint", checkpoint, "--seed", "0",
                         "--n_epochs", args.epochs, "--overwrite", "--progress_seconds", "10", *common),
             args.train_limit_s)
    if not ok:
        return False
    # One process draws every prior's samples (api, as --sample does) and times each draw.
    sampled = run(log, [sys.executable, "-c", SAMPLE_EVERY_PRIOR, checkpoint, args.device, args.samples, args.out],
                  90)
    # --eval's likelihood figures, their seconds in the log (FID needs the Inception file, which
    # does not travel: it is computed on a CPU from the samples).
    evaluated = run(log, vanvae("--eval", "--checkpoint", checkpoint, "--iw_samples", "100", "--fid_samples", "0",
                                "--seed", "0", *common), 60)
    for report in Path(args.work).rglob("eval.json"):
        log(f"  {report}: seconds {json.loads(report.read_text())['seconds']}")
    return sampled and evaluated


SAMPLE_EVERY_PRIOR = """
import sys, time, torch
import api
path, device, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
vae = api.load(path, device=device)
for prior in vae.priors:
    start = time.perf_counter()
    samples = vae.sample(n, prior, seed=0)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    torch.save(samples, f"{out}/samples_{prior}.pt")
    print(f"{prior}: {n} samples in {seconds:.2f} s -> {out}/samples_{prior}.pt (uint8, for FID on a CPU)")
"""


def torchrun_resume(log, args):
    dataset = "fashionmnist" if not args.dry_run else tiny_fashion_array(args, 512)
    checkpoint = Path(args.work) / "torchrun.pt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "VanVAE.py"]
    common = ["--train", "--dataset", dataset, "--checkpoint", checkpoint, "--data_dir", args.data,
              "--output_dir", args.work, "--seed", "0", "--device", args.device]
    return (run(log, [*torchrun, *common, "--n_epochs", "1", "--overwrite"], 90)
            and run(log, [*torchrun, *common, "--n_epochs", "2", "--resume"], 90))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the log and the samples (the device's $OUT)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="every step on the CPU with tiny sizes (a minute or two), to prove the script")
    p.add_argument("--wheels", default="device/wheels", help="wheels for what the machine lacks "
                   "(default: device/wheels)")
    p.add_argument("--fashion_gz", default="device/fashion-mnist",
                   help="the four Fashion-MNIST .gz files (default: device/fashion-mnist; the dry run falls "
                        "back on /usr/share/datasets/fashion-mnist)")
    p.add_argument("--work", default=None, help="scratch folder (default: a folder beside --out)")
    p.add_argument("--budget_s", type=float, default=480, help="seconds for the whole check; each step's "
                   "limit is cut to what is left (default: 480, the device tool's one call with room to spare)")
    args = p.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    args.epochs, args.samples = (1, 100) if args.dry_run else (100, SAMPLES)
    args.train_limit_s = 150 if args.dry_run else 270
    args.work = args.work or str(Path(args.out).resolve().parent / "device_check_work")
    args.data = str(Path(args.work) / "data")
    if args.dry_run and not Path(args.fashion_gz).is_dir():
        args.fashion_gz = "/usr/share/datasets/fashion-mnist"
    return args


def main(argv=None):
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    log = Log(Path(args.out) / "device_check.log")
    DEADLINE[0] = time.perf_counter() + args.budget_s
    log(f"VanVAE device check{' (dry run, CPU)' if args.dry_run else ''}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    bench = ["--device", "cpu", "--quick", "--generated"] if args.dry_run else ["--device", "cuda", "--data_dir",
                                                                                  args.data]
    steps = [
        ("machine", lambda: machine(log, args)),
        ("wheels", lambda: install_wheels(log, args)),
        ("data", lambda: unpack_fashion(log, args)),
        ("device tests", lambda: run(log, [sys.executable, "-m", "pytest", "-q", "-m", "device", "tests"], 90,
                                     env={"VANVAE_TEST_DEVICE": args.device})),
        ("bench", lambda: run(log, [sys.executable, "bench.py", *bench], 120 if args.dry_run else 60)),
        ("train, fit, sample", lambda: train_and_sample(log, args)),
        ("torchrun and resume", lambda: torchrun_resume(log, args)),
    ]
    failed = []
    start = time.perf_counter()
    for name, step in steps:
        log(f"== {name} ({time.perf_counter() - start:.0f} s in)")
        try:
            ok = step()
        except Exception as e:  # one broken step must not cost the others their minutes
            log(f"  {name} raised {type(e).__name__}: {e}")
            ok = False
        if not ok:
            failed.append(name)
    log(f"== done in {time.perf_counter() - start:.0f} s; "
        + (f"FAILED: {', '.join(failed)}" if failed else "every step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
