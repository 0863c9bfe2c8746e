"""Checkpoints written by two processes joined by ``jax.distributed`` (CPU, one device each):
every process calls ``save``; replacing a checkpoint (``overwrite=True``) must leave exactly the
new one, with no process racing another over the directories."""

import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent(
    """
    import pathlib, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 1)
    port, pid, out = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid
    )
    import jax.numpy as jnp
    import numpy as np
    from refax import nnx
    from refax.training import checkpoint

    # arrays replicated over both processes' devices (orbax saves global arrays only)
    mesh = jax.make_mesh((2,), ("d",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def global_array(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])

    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    model.bias[...] = global_array(model.bias[...])
    path = out / "ckpt"
    for step in range(3):  # a first save, then two overwrites
        model.kernel[...] = global_array(np.full((2, 3), float(step)))
        checkpoint.save(path, model, overwrite=step > 0)
        # every process reads what was just written, right after save returns
        got = checkpoint.load_pure_dict(path)["kernel"]
        got = got.addressable_data(0) if isinstance(got, jax.Array) else got
        np.testing.assert_array_equal(np.asarray(got), np.full((2, 3), float(step)))
    print(f"process {pid} ok:", sorted(p.name for p in out.iterdir()))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_overwrite_a_checkpoint(tmp_path: pathlib.Path):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(port), str(i), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out}\n{err[-4000:]}"
        assert f"process {i} ok: ['ckpt']" in out  # no directory left aside
