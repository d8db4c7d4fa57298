"""How fast VanVAE trains, samples and evaluates, next to GenerativeZoo's pipeline, in one table.

    python bench.py --data_dir /work/data     # real Fashion-MNIST where installed; a few minutes
    python bench.py --quick                   # a few steps: checks the script, not the speed

(a) is VanVAE's own pipeline: uint8 images at native size in memory and training.TrainStep, the
training loop's own step (batch, binarisation, noise, Adam step, running sums), with
settings.RunChoices' defaults for precision and memory layout. (b) is GenerativeZoo's, rebuilt: a
torchvision dataset with per-image Resize(32), ToTensor and Normalize(0.5, 0.5), a DataLoader
with num_workers 0, the same network at 32 px with its MSE loss, plain Adam and a .item() every
step. Each (pipeline, images, repeat) runs in its
own process, so peak memory is its own; (a) and (b) alternate, and the table gives medians.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

import data
import kernels
import metrics
import training
import util
import vae
from settings import PRECISIONS, RunChoices, TrainingRecord, TrainSettings
from util import UserError

IMAGE_SETS = {"grey28": "28 px grey (Fashion-MNIST)", "colour32": "32 px colour"}
GENERATIVEZOO_KLD_WEIGHT = 1e-4
COLUMNS = ("device", "images", "pipeline", "precision", "train images/s", "train images/CPU-s",
           "sample images/s",
           "eval images/s", "peak RSS MiB", "train MFLOP/image", "train GFLOP/s", "% of matmul peak")


# ---------------------------------------------------------------- data for both pipelines

class PILImages(Dataset):
    """uint8 (N, C, H, W) images handed out one PIL image at a time, as torchvision's
    FashionMNIST and CIFAR10 do, for when the real files are not installed."""

    def __init__(self, images, transform):
        self.images, self.transform = images.permute(0, 2, 3, 1).numpy(), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        image = Image.fromarray(image[..., 0], mode="L") if image.shape[-1] == 1 else Image.fromarray(image)
        return self.transform(image), 0


def generated_images(n, shape, seed):
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def uint8_splits(image_set, data_dir, n_train, n_test):
    """(train, test, source) uint8 tensors at native size: Fashion-MNIST if installed."""
    if image_set == "grey28" and data_dir is not None:
        try:
            train = data.load_split("fashionmnist", "train", data_dir, download=False)[0]
            test = data.load_split("fashionmnist", "test", data_dir, download=False)[0]
            return train[:n_train], test[:n_test], "real"
        except UserError:
            pass
    shape = (1, 28, 28) if image_set == "grey28" else (3, 32, 32)
    return generated_images(n_train, shape, 0), generated_images(n_test, shape, 1), "generated"


def generativezoo_datasets(image_set, data_dir, train_u8, test_u8, source):
    """GenerativeZoo's transforms on the same images: torchvision's own dataset where real."""
    channels = 1 if image_set == "grey28" else 3
    transform = transforms.Compose([transforms.Resize(32), transforms.ToTensor(),
                                    transforms.Normalize((0.5,) * channels, (0.5,) * channels)])
    if source == "real":
        return (datasets.FashionMNIST(data_dir, train=True, transform=transform, download=False),
                datasets.FashionMNIST(data_dir, train=False, transform=transform, download=False))
    return PILImages(train_u8, transform), PILImages(test_u8, transform)


# ---------------------------------------------------------------- the two pipelines

def plain_torch_layers(model):
    """GenerativeZoo's network uses stock nn.Conv2d/ConvTranspose2d: undo VanVAE's GEMM bottleneck."""
    for module in model.modules():
        if isinstance(module, kernels.Conv2d):
            module.__class__ = nn.Conv2d
        elif isinstance(module, kernels.ConvTranspose2d):
            module.__class__ = nn.ConvTranspose2d
    return model


class VanVAEPipeline:
    """(a): the training loop's own step (training.TrainStep) on native-size uint8 tensors."""

    def __init__(self, train_u8, test_u8, batch_size, device, settings):
        shape = tuple(train_u8.shape[1:])
        self.model = vae.VanillaVAE(vae.VAEConfig("bench", shape)).to(device)
        self.settings, self.device, self.batch_size = settings, device, batch_size
        self.step = training.TrainStep(self.model, settings, device)
        self.precision = self.step.precision
        self.train_u8 = training.images_on_device(train_u8, device)
        self.test_u8 = training.images_on_device(test_u8, device)
        self.order = torch.randperm(train_u8.shape[0])
        self.step_index = 0
        self.sums = torch.zeros(3, device=device, dtype=torch.float64)

    def train_steps(self, n):
        n_batches = self.train_u8.shape[0] // self.batch_size
        all_rows = slice(None)  # one process: the whole batch
        for _ in range(n):
            i = self.step_index % n_batches
            self.step_index += 1
            idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
            self.sums += self.step(self.train_u8, idx, self.batch_size, all_rows, self.settings.record.lr,
                                   self.settings.record.kld_weight)
            if self.step_index % 25 == 0:
                self.sums[2].item()  # the loop's one host sync per 25 steps
        self.sums[2].item()

    def sample(self, n):
        self.model.eval()
        self.model.sample(n, torch.Generator(self.device).manual_seed(2), self.device)
        self.model.train()

    def test_pass(self):
        metrics.mean_elbo_terms(self.model, self.test_u8, self.settings.record.kld_weight, self.batch_size)
        return self.test_u8.shape[0]


class GenerativeZooPipeline:
    """(b): GenerativeZoo's VanillaVAE training loop, per its train_model and eval_model."""

    def __init__(self, train_set, test_set, channels, batch_size, device, lr):
        config = vae.VAEConfig("bench", (channels, 32, 32), recon_loss="mse")
        self.model = plain_torch_layers(vae.VanillaVAE(config)).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.device, self.batch_size, self.test_set = device, batch_size, test_set
        self.loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=0)
        self.batches = iter(self.loader)

    def forward_loss(self, x):
        mu, logvar = self.model.encode(x)
        recon_x = torch.tanh(self.model.decode(self.model.reparameterize(mu, logvar)))
        kld = torch.mean(-0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1), dim=0)
        return F.mse_loss(recon_x, x) + kld * GENERATIVEZOO_KLD_WEIGHT

    def next_images(self):
        try:
            return next(self.batches)[0]
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)[0]

    def train_steps(self, n):
        running_loss = 0.0
        for _ in range(n):
            x = self.next_images().to(self.device)
            loss = self.forward_loss(x)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            running_loss += loss.item()

    def sample(self, n):
        self.model.eval()
        with torch.no_grad():
            torch.tanh(self.model.decode(torch.randn(n, self.model.config.latent_dim, device=self.device)))
        self.model.train()

    def test_pass(self):
        self.model.eval()
        with torch.no_grad():
            for x, _ in DataLoader(self.test_set, batch_size=self.batch_size):
                self.forward_loss(x.to(self.device)).item()
        self.model.train()
        return len(self.test_set)


# ---------------------------------------------------------------- measuring one pipeline

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(work, n_images, device):
    """Images per wall-clock second, and per CPU-second of this process (all its threads): on a
    shared machine the second is the steadier, as time waiting for a core is not counted."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    work()
    synchronize(device)
    return n_images / (time.perf_counter() - start), n_images / (time.process_time() - start_cpu)


def train_flops_per_image(pipeline, batch_size):
    """Floating-point operations of one training step (forward, backward), per image.

    FlopCounterMode counts convolutions and matrix products (2 per multiply-add), which are
    nearly all of this network's arithmetic; elementwise ops and Adam are not counted."""
    counter = FlopCounterMode(display=False)
    with counter:
        pipeline.train_steps(1)
    return counter.get_total_flops() / batch_size


def measure(job):
    """Run one (pipeline, image set) measurement; returns a dict of figures."""
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    batch_size, steps = job["batch_size"], job["steps"]
    n_train = max(batch_size * (steps + job["warmup"] + 2), job["n_test"])
    train_u8, test_u8, source = uint8_splits(job["image_set"], job["data_dir"], n_train, job["n_test"])
    if job["pipeline"] == "a":
        util.keep_freed_memory()  # as VanVAE.py does
        settings = TrainSettings(TrainingRecord(job["image_set"], seed=0, batch_size=batch_size),
                                 RunChoices(**job["settings"]))
        pipeline = VanVAEPipeline(train_u8, test_u8, batch_size, device, settings)
        precision = pipeline.precision
    else:
        train_set, test_set = generativezoo_datasets(job["image_set"], job["data_dir"], train_u8,
                                                     test_u8, source)
        if source == "real":
            test_set = torch.utils.data.Subset(test_set, range(job["n_test"]))
        pipeline = GenerativeZooPipeline(train_set, test_set, train_u8.shape[1], batch_size, device,
                                         TrainingRecord.lr)
        precision = "fp32"
    pipeline.train_steps(job["warmup"])
    train_rate, train_cpu_rate = images_per_second(lambda: pipeline.train_steps(steps),
                                                   steps * batch_size, device)
    sample_rate, _ = images_per_second(lambda: pipeline.sample(job["n_sample"]), job["n_sample"], device)
    pipeline.test_pass()  # warm-up: first eval-mode calls pick their kernels
    eval_rate, _ = images_per_second(pipeline.test_pass, job["n_test"], device)
    flops = train_flops_per_image(pipeline, batch_size)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        peak_rss_mib = max(peak_rss_mib, torch.cuda.max_memory_allocated() / 2**20)
    return {"source": source, "precision": precision, "train": train_rate,
            "train_cpu": train_cpu_rate, "sample": sample_rate,
            "eval": eval_rate, "rss_mib": peak_rss_mib, "flops_per_image": flops}


# ---------------------------------------------------------------- the machine's matmul peak

def matmul_peak_flops(device, dtype, size, repeats):
    """Best observed rate of a large square matrix product, the ceiling for convs and GEMMs:
    (FLOP per wall second, FLOP per CPU-second)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    best, best_cpu = 0.0, 0.0
    for _ in range(repeats):
        rate, cpu_rate = images_per_second(lambda: torch.mm(a, b), 1, device)
        best, best_cpu = max(best, rate * 2 * size ** 3), max(best_cpu, cpu_rate * 2 * size ** 3)
    return best, best_cpu


ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
CPU_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))


def machine_name(device):
    """The device, and for a CPU its model, the vector flags that decide its speed (which of
    AVX2, AVX-512, AVX512-BF16 and AMX it has), cores and threads: a figure says where it came from."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == (platform.processor() or platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    has = (", ".join(f"{label} {'yes' if flag in flags else 'no'}" for flag, label in CPU_FLAGS)
           if flags else "flags unknown")
    # Set, these make an AVX-512 machine run the kernels an AVX2-only one would (bench's way
    # to measure that kind of machine where none is at hand); the line must say so.
    limits = [f"{var}={os.environ[var]}" for var in ISA_LIMITS if os.environ.get(var)]
    limited = (f"; instruction sets limited by {' '.join(limits)}, ATen kernels "
               f"{torch.backends.cpu.get_cpu_capability()}" if limits else "")
    return f"{name} ({has}{limited}), {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------- the table

def run_job(job):
    """One measurement in a fresh process, so each has its own peak memory."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--job", json.dumps(job)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench.py: a measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def row(device, image_set, pipeline, results, peaks):
    med = {k: statistics.median(r[k] for r in results)
           for k in ("train", "train_cpu", "sample", "eval", "rss_mib")}
    first = results[0]
    gflops = first["flops_per_image"] * med["train"] / 1e9
    # Per CPU-second on both sides (per wall second on a GPU), so a busy machine cancels out.
    key = "train" if device == "cuda" else "train_cpu"
    _, peak_cpu = peaks.get(first["precision"], peaks["fp32"])
    peak_fraction = first["flops_per_image"] * med[key] / peak_cpu
    label = {"a": "(a) VanVAE", "b": "(b) GenerativeZoo"}[pipeline]
    shape = "28 px" if pipeline == "a" and image_set == "grey28" else "32 px"
    return [device, f"{IMAGE_SETS[image_set]}, {first['source']}", f"{label} at {shape}", first["precision"],
            f"{med['train']:.0f}", f"{med['train_cpu']:.0f}", f"{med['sample']:.0f}", f"{med['eval']:.0f}",
            f"{med['rss_mib']:.0f}",
            f"{first['flops_per_image'] / 1e6:.1f}", f"{gflops:.1f}", f"{100 * peak_fraction:.0f}"]


def print_table(rows):
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def bench_device(device, args, settings):
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    precisions = {"fp32", training.resolve_precision(settings.get("precision", RunChoices.precision),
                                                device)}
    peaks = {p: matmul_peak_flops(device, {"fp32": torch.float32, "bf16": torch.bfloat16,
                                           "fp16": torch.float16}[p], args.matmul_size, args.repeats + 2)
             for p in sorted(precisions)}
    print(f"\n{device.type}: {machine_name(device)}; torch {torch.__version__}; batch {args.batch_size}; "
          f"{args.steps} timed training steps after {args.warmup}, {args.repeats} repeat(s), medians")
    print("matmul peak (torch.mm, %d x %d): %s" % (args.matmul_size, args.matmul_size, "; ".join(
        f"{p} {rate / 1e9:.0f} GFLOP/s, {cpu_rate / 1e9:.0f} GFLOP per CPU-s"
        for p, (rate, cpu_rate) in sorted(peaks.items()))))
    rows, ratios = [], {}
    for image_set in IMAGE_SETS:
        results = {"a": [], "b": []}
        for repeat in range(args.repeats):
            for pipeline in ("a", "b") if repeat % 2 == 0 else ("b", "a"):
                job = {"pipeline": pipeline, "image_set": image_set, "device": device.type,
                       "threads": threads, "batch_size": args.batch_size, "steps": args.steps,
                       "warmup": args.warmup, "n_test": args.n_test, "n_sample": args.n_sample,
                       "data_dir": None if args.generated else args.data_dir, "settings": settings}
                results[pipeline].append(run_job(job))
        rows += [row(device.type, image_set, p, results[p], peaks) for p in ("a", "b")]
        ratios[image_set] = {k: [a[k] / b[k] for a, b in zip(results["a"], results["b"])]
                             for k in ("train", "train_cpu")}
    print_table(rows)
    for image_set, paired in ratios.items():
        for key, unit in (("train", "images/s"), ("train_cpu", "images/CPU-s")):
            print(f"(a)/(b) training {unit}, {IMAGE_SETS[image_set]}: "
                  f"{statistics.median(paired[key]):.2f}x "
                  f"(per repeat: {', '.join(f'{r:.2f}' for r in paired[key])})")
    print("MFLOP/image: convolutions and matrix products of one training step (forward and "
          "backward), counted by torch.utils.flop_counter. % of matmul peak: training FLOP per "
          "CPU-second over torch.mm's in the same precision (per wall second on a GPU).")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="./data", help="where Fashion-MNIST is found (default: ./data); "
                   "generated images are used when it is not there")
    p.add_argument("--batch_size", type=int, default=128, help="images per step, both pipelines (default: 128)")
    p.add_argument("--steps", type=int, default=60, help="timed training steps per measurement (default: 60)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per pipeline, alternating (default: 3)")
    p.add_argument("--n_test", type=int, default=2048, help="images evaluated (default: 2048)")
    p.add_argument("--n_sample", type=int, default=1024, help="images sampled in one call (default: 1024)")
    p.add_argument("--matmul_size", type=int, default=2048, help="side of the peak-rate matrices (default: 2048)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per usable CPU)")
    p.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                   help="which devices to measure (default: all, meaning the CPU and CUDA if present)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="(a)'s precision (default: none, meaning settings.RunChoices' default)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="(a)'s memory layout (default: settings.RunChoices' default)")
    p.add_argument("--generated", action="store_true",
                   help="generated images even where Fashion-MNIST is installed (faster to load)")
    p.add_argument("--quick", action="store_true", help="2 steps, 1 repeat, small sets: checks the script runs")
    p.add_argument("--loading", type=int, default=None, metavar="N",
                   help="measure only the loading of your own images: N PNGs written from Fashion-MNIST "
                        "(generated where it is absent), decoded by images.py cold and cached, against "
                        "a torchvision ImageFolder with a DataLoader")
    p.add_argument("--iw", type=int, default=None, metavar="N",
                   help="measure only --eval's importance-weighted bound at K=1000 on N test images "
                        "(the default model, its weights as initialised: the speed does not depend on "
                        "them), against its floor, the decoder's FLOPs over the fp32 matmul rate")
    p.add_argument("--profile", type=int, default=None, metavar="N",
                   help="show only where (a)'s training step spends its time: torch.profiler over N "
                        "steps at 28 px after --warmup, a table of each operator and input shape (so "
                        "each layer) by its share of the step's time; with ONEDNN_MAX_CPU_ISA=AVX2 "
                        "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 set, the kernels an "
                        "AVX2-only CPU runs")
    p.add_argument("--profile_rows", type=int, default=25, help="rows of the --profile table (default: 25)")
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.n_test, args.n_sample = 2, 1, 1, 64, 32
        args.matmul_size = 512
    return args


# ---------------------------------------------------------------- where a step's time goes

def bench_profile(args, settings):
    """torch.profiler over --profile N of (a)'s training steps: each operator, by input shapes,
    with its self time per step on the calling thread (an op's own time, its children's apart;
    intra-op threads work inside it) and its share of the steps' total, the largest first."""
    from torch.profiler import ProfilerActivity, profile
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    device, n, batch = torch.device("cpu"), args.profile, args.batch_size
    train_u8, test_u8, source = uint8_splits("grey28", None if args.generated else args.data_dir,
                                             batch * (n + args.warmup + 2), batch)
    util.keep_freed_memory()  # as VanVAE.py does
    pipeline = VanVAEPipeline(train_u8, test_u8, batch, device,
                              TrainSettings(TrainingRecord("grey28", seed=0, batch_size=batch),
                                            RunChoices(**settings)))
    pipeline.train_steps(args.warmup)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        pipeline.train_steps(n)
        wall = time.perf_counter() - start
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total,
                    reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile: (a) VanVAE's training step at 28 px ({source} Fashion-MNIST), {pipeline.precision}, "
          f"batch {batch}, {n} steps after {args.warmup}; {machine_name(device)}; torch {torch.__version__}")
    print(f"{1000 * wall / n:.1f} ms per step under the profiler ({n * batch / wall:.0f} images/s; the "
          f"profiler's own cost included); self time in operators {total_us / 1000 / n:.1f} ms per step")
    print("| operator | input shapes | calls per step | self ms per step | % of self time |")
    print("|---|---|---|---|---|")
    for e in events[:args.profile_rows]:
        shapes = ", ".join("x".join(map(str, shape)) for shape in e.input_shapes if shape)[:70]
        print(f"| {e.key} | {shapes} | {e.count / n:g} | {e.self_cpu_time_total / 1000 / n:.2f} | "
              f"{100 * e.self_cpu_time_total / total_us:.1f} |")


# ---------------------------------------------------------------- loading the user's own images

def write_pngs(images_u8, folder):
    """One grey PNG per image in folder/0/ (ImageFolder wants a class folder)."""
    os.makedirs(os.path.join(folder, "0"))
    for i, image in enumerate(images_u8[:, 0].numpy()):
        Image.fromarray(image, mode="L").save(os.path.join(folder, "0", f"{i:05d}.png"))


def timed(work):
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def bench_loading(args):
    """Images per second into uint8 tensors: images.load_source decoding a folder of PNGs (cold),
    the same from its cache (warm), and a torchvision ImageFolder + DataLoader epoch."""
    import tempfile

    import images as image_files
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    n = args.loading
    train_u8, _, source = uint8_splits("grey28", None if args.generated else args.data_dir, n, 0)
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = os.path.join(tmp, "pngs"), os.path.join(tmp, "cache")
        _, write_s = timed(lambda: write_pngs(train_u8[:n], folder))
        print(f"\nloading: {n} PNGs of 28 x 28 grey ({source} Fashion-MNIST images) written in "
              f"{write_s:.1f} s; {machine_name(torch.device('cpu'))}")
        cold, cold_s = timed(lambda: image_files.load_source(folder, cache_dir=cache, progress=False,
                                                             test_fraction=0.0))
        warm, warm_s = timed(lambda: image_files.load_source(folder, cache_dir=cache, progress=False,
                                                             test_fraction=0.0))
        assert warm["info"]["cached"] and torch.equal(cold["train"], warm["train"])
        rows = [("images.py, first run (decode in worker processes, write the cache)", cold_s),
                ("images.py, second run (from the cache)", warm_s)]
        for workers in (0, 2):
            loader = DataLoader(datasets.ImageFolder(folder, transform=transforms.ToTensor(),
                                                     loader=lambda p: Image.open(p).convert("L")),
                                batch_size=128, num_workers=workers)
            _, epoch_s = timed(lambda: sum(x.shape[0] for x, _ in loader))
            rows.append((f"ImageFolder + DataLoader(num_workers={workers}), one epoch", epoch_s))
    print("| how | seconds | images/s |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {n / seconds:.0f} |")
    tensor_mib = cold["train"].numel() / 2**20
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"the uint8 tensor: {tensor_mib:.0f} MiB; this process's peak resident memory {peak_mib:.0f} MiB "
          "(torch included); ImageFolder decodes every image again every epoch")


def bench_iw_bound(args, k=1000):
    """metrics.iw_log_likelihood at K=k on N images: minutes per 10,000 test images (the
    --eval protocol) against the floor of the decoder's forward FLOPs over torch.mm's rate,
    with user and system CPU time and page faults (the system time's cause)."""
    util.keep_freed_memory()  # as VanVAE.py does
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    _, test_u8, source = uint8_splits("grey28", None if args.generated else args.data_dir, args.iw, args.iw)
    test_u8 = test_u8[:args.iw]
    torch.manual_seed(0)
    model = vae.VanillaVAE(vae.VAEConfig("fashionmnist", (1, 28, 28))).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.decode(torch.zeros(256, model.config.latent_dim))
    decoder_flops = counter.get_total_flops() / 256
    peak, _ = matmul_peak_flops(torch.device("cpu"), torch.float32, args.matmul_size, 5)
    metrics.iw_log_likelihood(model, test_u8[:2], k)  # warm-up: oneDNN picks its kernels
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    metrics.iw_log_likelihood(model, test_u8, k)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    minutes = wall / test_u8.shape[0] * 10000 / 60
    floor = decoder_flops * k * 10000 / peak / 60
    print(f"IW bound, K={k}, {test_u8.shape[0]} {source} Fashion-MNIST test images, fp32; "
          f"{machine_name(torch.device('cpu'))}")
    print(f"decoder forward {decoder_flops / 1e6:.2f} MFLOP per sample; torch.mm fp32 {peak / 1e9:.0f} GFLOP/s")
    print(f"| K=1000 over 10,000 images | minutes | x floor |\n|---|---|---|\n"
          f"| floor (decoder FLOPs / matmul rate) | {floor:.1f} | 1.00 |\n"
          f"| measured | {minutes:.1f} | {minutes / floor:.2f} |")
    print(f"CPU time: user {after.ru_utime - before.ru_utime:.1f} s, system {after.ru_stime - before.ru_stime:.1f} s, "
          f"{after.ru_minflt - before.ru_minflt} page faults, in {wall:.1f} s wall")


def main(argv=None):
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # each table line as soon as it is measured
    if args.loading:
        bench_loading(args)
        return 0
    if args.iw:
        bench_iw_bound(args)
        return 0
    # (a)'s settings where the flags say, else settings.RunChoices' defaults
    base = {k: v for k, v in (("precision", args.precision), ("channels_last", args.channels_last))
            if v is not None}
    if args.profile:
        bench_profile(args, base)
        return 0
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return 0
    devices = [torch.device("cpu")] if args.device in ("all", "cpu") else []
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for device in devices:
        bench_device(device, args, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
