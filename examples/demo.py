"""refax demo: a small CNN on scikit-learn's 8x8 handwritten digits, on one device or many.

Run with ``make demo`` (``make demo ARGS="--devices 8"`` or ``ARGS="--processes 2"``). It shows
the whole stack on a real, if tiny, task (1797 images shipped with scikit-learn, no download):

* a Module of ``nnx.Conv``, ``nnx.BatchNorm``, ``nnx.Dropout`` and ``nnx.Linear`` layers,
  summarised by ``nnx.tabulate`` before training;
* a train step under ``nnx.jit`` with ``nnx.value_and_grad``, ``nnx.Optimizer`` and an
  ``nnx.MultiMetric`` whose running loss and accuracy feed a progress bar (BatchNorm
  statistics, Dropout keys and metric totals are updated in place inside the jitted step);
* data parallelism: the batch is sharded over a one-axis device mesh (``jax.make_mesh``,
  ``NamedSharding``) and the model, optimizer and metrics are replicated, so the same code runs
  on 1 device, 8 simulated CPU devices (``--devices 8``), or 2 processes joined by
  ``jax.distributed.initialize`` with 4 devices each (``--processes 2``; this script starts the
  processes itself, refax has no launcher). Each process feeds its share of every global
  batch with ``jax.make_array_from_process_local_data``;
* a checkpoint (``refax.training.checkpoint``, orbax underneath) restored into an abstract model
  from ``nnx.eval_shape``, whose predictions must equal the trained model's exactly;
* a PNG of the loss and accuracy curves next to the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.datasets import load_digits

from refax import nnx
from refax.training import checkpoint

BATCH = 128  # global batch; a multiple of every device count used here
TEST_SIZE = 360  # held-out images (of 1797); also a multiple of the device count
QUICK_STEPS = 30  # --quick: train this many steps only
MIN_ACCURACY = 0.95  # a full run must reach this test accuracy


# -- data --------------------------------------------------------------------------------------
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as ``(x_train, y_train, x_test, y_test)``, NHWC in [0, 1]."""
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    return x[train], y[train], x[test], y[test]


# -- model -------------------------------------------------------------------------------------
class CNN(nnx.Module):
    """Two 3x3 convolutions with BatchNorm, 2x2 average pooling, then a two-layer MLP head."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
        self.norm1 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.norm2 = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.hidden = nnx.Linear(4 * 4 * 64, 128, rngs=rngs)
        self.head = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.norm1(self.conv1(x)))  # (B, 8, 8, 32)
        x = nnx.relu(self.norm2(self.conv2(x)))  # (B, 8, 8, 64)
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))  # (B, 4, 4, 64)
        x = self.dropout(x.reshape(x.shape[0], -1))
        x = self.dropout(nnx.relu(self.hidden(x)))
        return self.head(x)


def new_metrics() -> nnx.MultiMetric:
    return nnx.MultiMetric(loss=nnx.metrics.Average("loss"), accuracy=nnx.metrics.Accuracy())


@nnx.jit
def train_step(
    model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, x: jax.Array, y: jax.Array
) -> None:
    def loss_fn(model: CNN) -> tuple[jax.Array, jax.Array]:
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)  # in place, like the BatchNorm statistics and Dropout keys
    metrics.update(loss=loss, logits=logits, labels=y)


@nnx.jit
def eval_step(model: CNN, metrics: nnx.MultiMetric, x: jax.Array, y: jax.Array) -> None:
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    metrics.update(loss=loss, logits=logits, labels=y)


@nnx.jit
def predict(model: CNN, x: jax.Array) -> jax.Array:
    return jnp.argmax(model(x), axis=-1)


@jax.jit
def all_equal(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.all(a == b)  # in a jit: with several processes neither array is fully local


# -- sharding ----------------------------------------------------------------------------------
def replicate(mesh: jax.sharding.Mesh, *nodes: object) -> None:
    """Places every Variable of ``nodes`` on all devices of ``mesh`` (also across processes).

    ``jax.device_put`` cannot target devices of other processes; a jitted identity with
    replicated ``out_shardings`` can (each process supplies the same local value).
    """
    put = jax.jit(lambda state: state, out_shardings=NamedSharding(mesh, P()))
    for node in nodes:
        nnx.update(node, put(nnx.state(node)))


def abstract_replicated(mesh: jax.sharding.Mesh) -> CNN:
    """A CNN whose Variables hold ``ShapeDtypeStruct``s with a replicated sharding (no arrays)."""
    abstract = nnx.eval_shape(lambda: CNN(rngs=nnx.Rngs(0)))
    sharding = NamedSharding(mesh, P())
    placed = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), nnx.state(abstract)
    )
    nnx.update(abstract, placed)
    return abstract


class Batches:
    """Global batches sharded over the mesh's ``data`` axis; each process feeds its own rows."""

    def __init__(self, mesh: jax.sharding.Mesh):
        self.sharding = NamedSharding(mesh, P("data"))
        self.rank, self.size = jax.process_index(), jax.process_count()

    def __call__(self, *arrays: np.ndarray) -> list[jax.Array]:
        out = []
        for a in arrays:
            rows = len(a) // self.size  # this process's contiguous share of the global batch
            local = a[self.rank * rows : (self.rank + 1) * rows]
            out.append(jax.make_array_from_process_local_data(self.sharding, local, a.shape))
        return out


# -- output ------------------------------------------------------------------------------------
def plot(history: dict[str, list[float]], path: pathlib.Path) -> None:
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg (PNG) backend, without touching pyplot's global state
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = history["epoch"]  # one point per epoch: the training averages and the test set
    for split in ("train", "test"):
        loss_ax.plot(epochs, history[f"{split}_loss"], "o-", label=split)
        acc_ax.plot(epochs, history[f"{split}_accuracy"], "o-", label=split)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss", ylim=(0, None))
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.01))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)


def progress_bar(console: Console, disable: bool) -> Progress:
    return Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  accuracy {task.fields[accuracy]:.3f}"),
        TimeElapsedColumn(),
        console=console,
        disable=disable,
    )


# -- training ----------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> float:
    """Trains, evaluates, checkpoints and plots; returns the test accuracy."""
    main_process = jax.process_index() == 0
    console = Console(quiet=not main_process)
    # Auto axes: XLA propagates the batch sharding. (With Explicit axes, jax.make_mesh's
    # default, refax's Dropout fails: its mask is not sharded like its input.)
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=auto)
    batches = Batches(mesh)
    x_train, y_train, x_test, y_test = digits()
    steps_per_epoch = len(x_train) // BATCH
    total = QUICK_STEPS if args.quick else args.epochs * steps_per_epoch
    epochs = -(-total // steps_per_epoch)

    model = CNN(rngs=nnx.Rngs(params=0, dropout=1))
    if main_process:  # drawn by rich for this terminal's width
        print(nnx.tabulate(model, jnp.ones((BATCH, 8, 8, 1))))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    train_metrics, test_metrics = new_metrics(), new_metrics()
    replicate(mesh, model, optimizer, train_metrics, test_metrics)
    console.print(
        f"training on {len(x_train)} images for {total} steps of {BATCH}: "
        f"{jax.device_count()} device(s) in {jax.process_count()} process(es)"
    )

    history: dict[str, list[float]] = {k: [] for k in ("epoch", "train_loss", "train_accuracy")}
    history.update(test_loss=[], test_accuracy=[])
    x_eval, y_eval = batches(x_test, y_test)
    start, step = time.perf_counter(), 0
    with progress_bar(console, disable=not main_process) as bar:
        task = bar.add_task("train", total=total, epoch=1, loss=float("nan"), accuracy=0.0)
        for epoch in range(1, epochs + 1):
            model.train()
            train_metrics.reset()
            order = np.random.default_rng(epoch).permutation(len(x_train))
            for i in range(steps_per_epoch):
                if step == total:
                    break
                idx = order[i * BATCH : (i + 1) * BATCH]
                train_step(model, optimizer, train_metrics, *batches(x_train[idx], y_train[idx]))
                step += 1
                stats = {k: float(v) for k, v in train_metrics.compute().items()}
                bar.update(task, advance=1, epoch=epoch, **stats)
            model.eval()
            test_metrics.reset()
            eval_step(model, test_metrics, x_eval, y_eval)
            test = {k: float(v) for k, v in test_metrics.compute().items()}
            history["epoch"].append(step / steps_per_epoch)
            for k in ("loss", "accuracy"):
                history[f"train_{k}"].append(stats[k])
                history[f"test_{k}"].append(test[k])
            bar.console.print(
                f"epoch {epoch:2d}  train loss {stats['loss']:.4f}  accuracy "
                f"{stats['accuracy']:.3f} | test loss {test['loss']:.4f}  "
                f"accuracy {test['accuracy']:.3f}"
            )
    accuracy = history["test_accuracy"][-1]
    console.print(f"trained in {time.perf_counter() - start:.1f} s")

    # Checkpoint, then restore into a model that never held arrays: predictions must match.
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    # An orbax save is collective: every process calls it, process 0 (the primary host) creates
    # the directory, writes the metadata and commits; orbax spreads the bytes of replicated
    # arrays over the processes holding them. An old checkpoint (from an earlier run) is
    # replaced by process 0 once the new one is complete.
    checkpoint.save(ckpt, model, overwrite=True)
    restored = checkpoint.restore(ckpt, abstract_replicated(mesh))
    restored.eval()
    same = bool(all_equal(predict(model, x_eval), predict(restored, x_eval)))
    console.print(f"checkpoint {ckpt}: restored predictions {'match' if same else 'DIFFER'}")

    if main_process:
        plot(history, out / "curves.png")
        console.print(f"curves: {out / 'curves.png'}")
    console.print(f"test accuracy {accuracy:.4f}")
    if not same:
        raise SystemExit("demo: the restored model's predictions differ from the trained one's")
    if not args.quick and accuracy < MIN_ACCURACY:
        raise SystemExit(f"demo: test accuracy {accuracy:.4f} is below {MIN_ACCURACY}")
    return accuracy


# -- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Starts ``args.processes`` copies of this script joined by ``jax.distributed``.

    Process 0 prints to this terminal; the others' output goes to a log shown if they fail.
    When one process fails the others are stopped (they would wait for it forever).
    """
    port = free_port()
    procs, logs = [], []
    for i in range(args.processes):
        cmd = [sys.executable, __file__, *argv, "--process-id", str(i), "--port", str(port)]
        log = None if i == 0 else tempfile.TemporaryFile()
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=log))
        logs.append(log)
    codes: list[int | None] = [None] * len(procs)
    while None in codes:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            codes = [p.wait() for p in procs]
            break
        time.sleep(0.2)
    for i, (code, log) in enumerate(zip(codes, logs)):
        if code != 0 and log is not None:
            log.seek(0)
            sys.stderr.write(f"--- process {i} exited with {code}:\n")
            sys.stderr.write(log.read().decode(errors="replace"))
    return max(abs(c) for c in codes)


def quiet_native_stdout() -> None:
    """Sends what native code writes to stdout (gloo's connection notices) to /dev/null.

    Python's ``sys.stdout`` keeps writing to the original stream through a duplicate of it.
    """
    sys.stdout.flush()
    original = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
    sys.stdout = os.fdopen(original, "w", buffering=1)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    parser.add_argument("--out", default="demo_out", help="directory for checkpoint and PNG")
    parser.add_argument("--quick", action="store_true", help=f"train {QUICK_STEPS} steps only")
    parser.add_argument(
        "--devices",
        type=int,
        default=0,
        help="simulated CPU devices in all (default 1, or 4 per process)",
    )
    parser.add_argument("--processes", type=int, default=1, help="processes on this machine")
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.processes > 1 and args.process_id is None:
        sys.exit(launch(args, argv))
    # Simulated CPU devices must be configured before JAX creates its CPU backend (on first
    # use); jax_num_cpu_devices takes precedence over --xla_force_host_platform_device_count.
    devices = args.devices or (4 * args.processes if args.processes > 1 else 1)
    if devices % args.processes:
        raise SystemExit(f"demo: {devices} devices cannot be split over {args.processes} processes")
    jax.config.update("jax_num_cpu_devices", devices // args.processes)
    if args.processes > 1:  # CPU collectives across processes: gloo, JAX's default
        quiet_native_stdout()
        jax.distributed.initialize(
            coordinator_address=f"localhost:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
        )
    train(args)


if __name__ == "__main__":
    main()
